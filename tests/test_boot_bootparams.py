"""The zero page: field offsets/sizes against a gcc probe of asm/bootparam.h, e820 map contents."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmm import layout
from vmm.boot import bootparams as bp
from vmm.boot.errors import BootError

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required for the boot_params probe")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <asm/bootparam.h>",
             "int main(void) {",
             '  printf("sizeof %zu\\n", sizeof(struct boot_params));',
             '  printf("e820_table %zu\\n", offsetof(struct boot_params, e820_table));',
             '  printf("e820_entry %zu\\n", sizeof(struct boot_e820_entry));',
             '  printf("e820_max %d\\n", E820_MAX_ENTRIES_ZEROPAGE);',
             '  printf("hdr %zu\\n", offsetof(struct boot_params, hdr));',
             '  printf("LOADED_HIGH %d\\n", LOADED_HIGH);',
             '  printf("CAN_USE_HEAP %d\\n", CAN_USE_HEAP);',
             '  printf("XLF_KERNEL_64 %d\\n", XLF_KERNEL_64);',
             '  printf("XLF_CAN_BE_LOADED_ABOVE_4G %d\\n", XLF_CAN_BE_LOADED_ABOVE_4G);']
    for name in bp.FIELDS:
        lines.append(f'  printf("F {name} %zu %zu\\n", offsetof(struct boot_params, {name}), '
                     f'sizeof(((struct boot_params *)0)->{name}));')
    lines.append("  return 0;\n}")
    d = tmp_path_factory.mktemp("bootprobe")
    (d / "p.c").write_text("\n".join(lines) + "\n")
    cc = subprocess.run(["gcc", "-o", str(d / "p"), str(d / "p.c")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(d / "p")], check=True, capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "F":
            res[parts[1]] = (int(parts[2]), int(parts[3]))
        else:
            res[parts[0]] = int(parts[1])
    return res


def test_zero_page_size(probe):
    assert probe["sizeof"] == layout.ZERO_PAGE_SIZE


@pytest.mark.parametrize("name", sorted(bp.FIELDS))
def test_field_offset_and_size_match_gcc(probe, name):
    off, fmt = bp.FIELDS[name]
    assert probe[name] == (off, struct.calcsize(fmt)), name


def test_e820_and_flags_match_gcc(probe):
    assert probe["e820_table"] == bp.E820_TABLE_OFFSET
    assert probe["e820_entry"] == bp.E820_ENTRY.size
    assert probe["e820_max"] == bp.E820_MAX_ENTRIES
    assert probe["hdr"] == bp.SETUP_HEADER_OFFSET
    assert probe["LOADED_HIGH"] == bp.LOADED_HIGH
    assert probe["CAN_USE_HEAP"] == bp.CAN_USE_HEAP
    assert probe["XLF_KERNEL_64"] == bp.XLF_KERNEL_64
    assert probe["XLF_CAN_BE_LOADED_ABOVE_4G"] == bp.XLF_CAN_BE_LOADED_ABOVE_4G


def test_e820_map_small_vm():
    assert bp.e820_map([(0, 128 * MiB)]) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x100000 - 0x9FC00, 2),        # EBDA, VGA, ROM and our ACPI tables at 0xE0000
        (0x100000, 128 * MiB - 0x100000, 1),
    ]


def test_e820_map_with_high_ram():
    e = bp.e820_map([(0, 3 * GiB), (4 * GiB, GiB)])
    assert e[-1] == (4 * GiB, GiB, 1)
    assert (0x100000, 3 * GiB - 0x100000, 1) in e
    # The ACPI area is reserved, never RAM.
    for addr, size, kind in e:
        if kind == 1:
            assert not addr <= layout.ACPI_TABLES_ADDR < addr + size


def _entries(zp: bp.ZeroPage):
    n = zp.get("e820_entries")
    return [bp.E820_ENTRY.unpack_from(zp.buf, bp.E820_TABLE_OFFSET + i * 20) for i in range(n)]


def test_build_zero_page_for_elf():
    zp = bp.build_zero_page(ram_ranges=[(0, 64 * MiB)], cmdline_addr=0x20000, cmdline_size=11,
                            initrd=(0x3000000, 0x1234), acpi_rsdp=0xE0000)
    assert zp.get("hdr.boot_flag") == 0xAA55
    assert zp.buf[0x202:0x206] == b"HdrS"
    assert zp.get("hdr.version") >= 0x020C
    assert zp.get("hdr.type_of_loader") == 0xFF
    assert zp.get("hdr.loadflags") & bp.LOADED_HIGH
    assert zp.get("hdr.cmd_line_ptr") == 0x20000 and zp.get("ext_cmd_line_ptr") == 0
    assert zp.get("hdr.cmdline_size") == 11
    assert zp.get("hdr.ramdisk_image") == 0x3000000 and zp.get("hdr.ramdisk_size") == 0x1234
    assert zp.get("acpi_rsdp_addr") == 0xE0000
    assert zp.get("hdr.vid_mode") == 0xFFFF
    assert _entries(zp) == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 63 * MiB, 1)]
    assert len(zp.to_bytes()) == 4096


def test_copy_setup_header_respects_its_length():
    image = bytearray(0x1000)
    image[0x1F1] = 7                       # setup_sects
    image[0x201] = 0x66                    # header ends at 0x202 + 0x66 = 0x268
    image[0x202:0x206] = b"HdrS"
    image[0x267] = 0xAB                    # last byte inside
    image[0x268] = 0xCD                    # first byte outside: must not be copied
    zp = bp.build_zero_page(ram_ranges=[(0, 64 * MiB)], cmdline_addr=0x20000, cmdline_size=0,
                            setup_header=bytes(image))
    assert zp.get("hdr.setup_sects") == 7
    assert zp.buf[0x267] == 0xAB and zp.buf[0x268] == 0
    assert zp.get("hdr.type_of_loader") == 0xFF       # ours, not the image's


def test_bad_values_raise_booterror():
    zp = bp.ZeroPage()
    with pytest.raises(BootError):
        zp.set("hdr.cmd_line_ptr", 1 << 32)
    image = bytearray(0x300)
    image[0x201] = 0xFF                      # claims a header running past the image
    with pytest.raises(BootError):
        zp.copy_setup_header(bytes(image))


def test_too_many_e820_entries():
    zp = bp.ZeroPage()
    for i in range(bp.E820_MAX_ENTRIES):
        zp.add_e820(i * 0x1000, 0x1000, 1)
    with pytest.raises(BootError):
        zp.add_e820(0x10000000, 0x1000, 1)
