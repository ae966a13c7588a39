"""The Linux x86 "zero page" (``struct boot_params``, asm/bootparam.h) the kernel reads at entry.

Only the fields a 64-bit direct boot needs are modelled, each with its byte offset and struct
format; ``tests/test_boot_bootparams.py`` checks every offset and size against a gcc probe of the
real header, so this table cannot drift from the kernel's ABI.
"""

from __future__ import annotations

import struct

from .. import layout
from .errors import BootError


# boot_params field -> (offset, struct format).  Names are C member designators.
FIELDS: dict[str, tuple[int, str]] = {
    "acpi_rsdp_addr": (0x070, "<Q"),
    "ext_ramdisk_image": (0x0C0, "<I"),
    "ext_ramdisk_size": (0x0C4, "<I"),
    "ext_cmd_line_ptr": (0x0C8, "<I"),
    "e820_entries": (0x1E8, "<B"),
    "sentinel": (0x1EF, "<B"),
    # struct setup_header hdr (packed) at 0x1F1
    "hdr.setup_sects": (0x1F1, "<B"),
    "hdr.root_flags": (0x1F2, "<H"),
    "hdr.syssize": (0x1F4, "<I"),
    "hdr.ram_size": (0x1F8, "<H"),
    "hdr.vid_mode": (0x1FA, "<H"),
    "hdr.root_dev": (0x1FC, "<H"),
    "hdr.boot_flag": (0x1FE, "<H"),
    "hdr.jump": (0x200, "<H"),
    "hdr.header": (0x202, "<I"),
    "hdr.version": (0x206, "<H"),
    "hdr.realmode_swtch": (0x208, "<I"),
    "hdr.start_sys_seg": (0x20C, "<H"),
    "hdr.kernel_version": (0x20E, "<H"),
    "hdr.type_of_loader": (0x210, "<B"),
    "hdr.loadflags": (0x211, "<B"),
    "hdr.setup_move_size": (0x212, "<H"),
    "hdr.code32_start": (0x214, "<I"),
    "hdr.ramdisk_image": (0x218, "<I"),
    "hdr.ramdisk_size": (0x21C, "<I"),
    "hdr.bootsect_kludge": (0x220, "<I"),
    "hdr.heap_end_ptr": (0x224, "<H"),
    "hdr.ext_loader_ver": (0x226, "<B"),
    "hdr.ext_loader_type": (0x227, "<B"),
    "hdr.cmd_line_ptr": (0x228, "<I"),
    "hdr.initrd_addr_max": (0x22C, "<I"),
    "hdr.kernel_alignment": (0x230, "<I"),
    "hdr.relocatable_kernel": (0x234, "<B"),
    "hdr.min_alignment": (0x235, "<B"),
    "hdr.xloadflags": (0x236, "<H"),
    "hdr.cmdline_size": (0x238, "<I"),
    "hdr.hardware_subarch": (0x23C, "<I"),
    "hdr.hardware_subarch_data": (0x240, "<Q"),
    "hdr.payload_offset": (0x248, "<I"),
    "hdr.payload_length": (0x24C, "<I"),
    "hdr.setup_data": (0x250, "<Q"),
    "hdr.pref_address": (0x258, "<Q"),
    "hdr.init_size": (0x260, "<I"),
    "hdr.handover_offset": (0x264, "<I"),
    "hdr.kernel_info_offset": (0x268, "<I"),
}
SETUP_HEADER_OFFSET = 0x1F1
E820_TABLE_OFFSET = 0x2D0
E820_ENTRY = struct.Struct("<QQI")          # struct boot_e820_entry (packed, 20 bytes)
E820_MAX_ENTRIES = 128

BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448                     # "HdrS"
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1


class ZeroPage:
    """A 4 KiB boot_params image built field by field."""

    def __init__(self) -> None:
        self.buf = bytearray(layout.ZERO_PAGE_SIZE)
        self._e820: list[tuple[int, int, int]] = []

    def set(self, name: str, value: int) -> None:
        off, fmt = FIELDS[name]
        try:
            struct.pack_into(fmt, self.buf, off, value)
        except struct.error as e:
            raise BootError(f"boot_params.{name} = {value:#x} does not fit ({fmt})") from e

    def get(self, name: str) -> int:
        off, fmt = FIELDS[name]
        return struct.unpack_from(fmt, self.buf, off)[0]

    def copy_setup_header(self, image: bytes) -> None:
        """Copy the image's setup header (0x1F1 up to 0x202 + image[0x201], per boot.rst)."""
        end = 0x202 + image[0x201]
        if end > len(image) or end > E820_TABLE_OFFSET:
            raise BootError(f"setup header end {end:#x} is outside the image / zero page")
        self.buf[SETUP_HEADER_OFFSET:end] = image[SETUP_HEADER_OFFSET:end]

    def add_e820(self, addr: int, size: int, kind: int) -> None:
        if size <= 0:
            return
        if len(self._e820) >= E820_MAX_ENTRIES:
            raise BootError("too many e820 entries")
        E820_ENTRY.pack_into(self.buf, E820_TABLE_OFFSET + len(self._e820) * E820_ENTRY.size,
                             addr, size, kind)
        self._e820.append((addr, size, kind))
        self.set("e820_entries", len(self._e820))

    @property
    def e820(self) -> list[tuple[int, int, int]]:
        return list(self._e820)

    def to_bytes(self) -> bytes:
        return bytes(self.buf)


def e820_map(ram_ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """e820 entries for guest RAM: conventional memory, the reserved BIOS area, then RAM.

    [0x9FC00, 1 MiB) is reserved: EBDA, VGA, ROM area and our ACPI tables at 0xE0000; marking it
    reserved keeps the kernel from allocating there.
    """
    out: list[tuple[int, int, int]] = []
    for gpa, size in ram_ranges:
        end = gpa + size
        if gpa < layout.EBDA_START:
            out.append((gpa, min(end, layout.EBDA_START) - gpa, layout.E820_RAM))
            if end > layout.EBDA_START:
                out.append((layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START,
                            layout.E820_RESERVED))
            if end > layout.HIGH_MEMORY_START:
                out.append((layout.HIGH_MEMORY_START, end - layout.HIGH_MEMORY_START, layout.E820_RAM))
        else:
            start = max(gpa, layout.HIGH_MEMORY_START)
            if end > start:
                out.append((start, end - start, layout.E820_RAM))
    return out


def build_zero_page(*, ram_ranges: list[tuple[int, int]], cmdline_addr: int, cmdline_size: int,
                    setup_header: bytes | None = None, initrd: tuple[int, int] | None = None,
                    acpi_rsdp: int | None = None) -> ZeroPage:
    """The boot_params a 64-bit kernel needs.

    ``setup_header``: the bzImage's first sectors (its header is copied) or None for an ELF
    vmlinux, which has no setup header; we then provide the fields the kernel checks.
    ``cmdline_size`` is the command line length without its NUL.
    """
    zp = ZeroPage()
    if setup_header is not None:
        zp.copy_setup_header(setup_header)
    else:
        zp.set("hdr.boot_flag", BOOT_FLAG_MAGIC)
        zp.set("hdr.header", HDRS_MAGIC)
        zp.set("hdr.version", 0x020F)
        zp.set("hdr.kernel_alignment", layout.KERNEL_LOAD_ADDR)
        zp.set("hdr.loadflags", LOADED_HIGH)
    zp.set("hdr.vid_mode", 0xFFFF)                    # "normal" video mode, no prompt
    zp.set("hdr.type_of_loader", layout.BOOT_LOADER_TYPE)
    zp.set("hdr.loadflags", zp.get("hdr.loadflags") | LOADED_HIGH)
    zp.set("hdr.cmd_line_ptr", cmdline_addr & 0xFFFFFFFF)
    zp.set("ext_cmd_line_ptr", cmdline_addr >> 32)
    zp.set("hdr.cmdline_size", cmdline_size)
    if initrd is not None:
        addr, size = initrd
        zp.set("hdr.ramdisk_image", addr & 0xFFFFFFFF)
        zp.set("ext_ramdisk_image", addr >> 32)
        zp.set("hdr.ramdisk_size", size & 0xFFFFFFFF)
        zp.set("ext_ramdisk_size", size >> 32)
    if acpi_rsdp is not None:
        zp.set("acpi_rsdp_addr", acpi_rsdp)
    for entry in e820_map(ram_ranges):
        zp.add_e820(*entry)
    return zp
