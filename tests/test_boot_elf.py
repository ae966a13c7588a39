"""ELF vmlinux loading and load_kernel() on ELF images: segments, BSS, entry, and every error."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmm import layout
from vmm.boot import BootError, elf, load_kernel
from vmm.boot.bootparams import E820_ENTRY, E820_TABLE_OFFSET, FIELDS
from vmm.memory import guest_ram

MiB = 1 << 20


def make_elf(segments, entry, *, ei_class=2, ei_data=1, machine=62, e_type=2, phentsize=56,
             phoff=None, extra_phdrs=()) -> bytes:
    """An ELF64 image: segments = [(paddr, vaddr, data, memsz)]."""
    phnum = len(segments) + len(extra_phdrs)
    phoff = 64 if phoff is None else phoff
    data_off = 64 + phnum * 56
    phdrs = b""
    blobs = b""
    for paddr, vaddr, data, memsz in segments:
        off = data_off + len(blobs)
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, off, vaddr, paddr, len(data), memsz, 0x1000)
        blobs += data
    for ph in extra_phdrs:
        phdrs += ph
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1, 0]) + bytes(8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0, 64,
                       phentsize, phnum, 64, 0, 0)
    return ehdr + phdrs + blobs


@pytest.fixture
def mem():
    m = guest_ram(64 * MiB)
    yield m
    m.close()


def write(tmp_path, data: bytes, name="vmlinux"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_loads_segments_and_zeroes_bss(tmp_path, mem):
    text = b"\x90" * 100 + b"\xf4"
    rodata = b"RODATA!!"
    img = make_elf([(0x1000000, 0xFFFFFFFF81000000, text, 0x1000),
                    (0x1200000, 0xFFFFFFFF81200000, rodata, 0x3000)], entry=0x1000000)
    mem.write(0x1200000, b"\xff" * 0x3000)            # garbage where BSS goes: must be zeroed
    k = elf.load(mem, write(tmp_path, img))
    assert k.entry == 0x1000000
    assert (k.start, k.end) == (0x1000000, 0x1203000)
    assert mem.read(0x1000000, len(text)) == text
    assert mem.read(0x1200000, 8) == rodata
    assert mem.read(0x1200008, 0x3000 - 8) == bytes(0x3000 - 8)


def test_virtual_entry_is_translated(tmp_path, mem):
    img = make_elf([(0x1000000, 0xFFFFFFFF81000000, b"\xf4" * 16, 16)], entry=0xFFFFFFFF81000008)
    assert elf.load(mem, write(tmp_path, img)).entry == 0x1000008


def test_gcc_built_static_elf(tmp_path, mem):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required")
    src = tmp_path / "k.c"
    src.write_text("void _start(void) { for (;;) __asm__ volatile(\"hlt\"); }\n")
    out = tmp_path / "k.elf"
    subprocess.run(["gcc", "-O2", "-nostdlib", "-static", "-no-pie", "-fno-pic", "-fcf-protection=none",
                    "-Wl,-Ttext-segment=0x1000000", "-Wl,--build-id=none", "-o", str(out), str(src)],
                   check=True, capture_output=True)
    nm = subprocess.run(["nm", str(out)], check=True, capture_output=True, text=True).stdout
    start = int(next(line.split()[0] for line in nm.splitlines() if line.endswith(" _start")), 16)
    k = elf.load(mem, out)
    assert k.entry == start
    assert mem.read(k.entry, 1) == b"\xf4"            # hlt, loaded where p_paddr says


@pytest.mark.parametrize("kwargs,msg", [
    ({"ei_class": 1}, "ELFCLASS64"),
    ({"ei_data": 2}, "little-endian"),
    ({"machine": 3}, "x86_64"),
    ({"e_type": 1}, "executable"),
    ({"phentsize": 32}, "program header size"),
    ({"phoff": 1 << 40}, "outside the file"),
])
def test_bad_headers(tmp_path, mem, kwargs, msg):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4", 1)], entry=0x1000000, **kwargs)
    with pytest.raises(BootError, match=msg):
        elf.load(mem, write(tmp_path, img))


def test_not_elf(tmp_path, mem):
    with pytest.raises(BootError, match="not an ELF"):
        elf.load(mem, write(tmp_path, b"MZ" + bytes(100)))


def test_truncated_header(tmp_path, mem):
    with pytest.raises(BootError, match="truncated"):
        elf.load(mem, write(tmp_path, b"\x7fELF\x02\x01"))


def test_segment_beyond_file(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4" * 64, 64)], entry=0x1000000)
    with pytest.raises(BootError, match="beyond the file"):
        elf.load(mem, write(tmp_path, img[:-10]))


def test_filesz_greater_than_memsz(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4" * 64, 32)], entry=0x1000000)
    with pytest.raises(BootError, match="p_filesz"):
        elf.load(mem, write(tmp_path, img))


def test_segment_out_of_ram(tmp_path, mem):
    img = make_elf([(63 * MiB, 63 * MiB, b"\xf4", 2 * MiB)], entry=63 * MiB)
    with pytest.raises(BootError, match="does not fit in guest RAM"):
        elf.load(mem, write(tmp_path, img))


def test_segment_in_the_mmio_hole(tmp_path):
    m = guest_ram(64 * MiB)
    try:
        img = make_elf([(0xD0000000, 0xD0000000, b"\xf4", 1)], entry=0xD0000000)
        with pytest.raises(BootError, match="does not fit"):
            elf.load(m, write(tmp_path, img))
    finally:
        m.close()


def test_segment_below_1mib_rejected(tmp_path, mem):
    img = make_elf([(0x7000, 0x7000, b"\xf4", 1)], entry=0x7000)
    with pytest.raises(BootError, match="below 1 MiB"):
        elf.load(mem, write(tmp_path, img))


def test_overlapping_segments(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"a", 0x2000), (0x1001000, 0x1001000, b"b", 0x10)],
                   entry=0x1000000)
    with pytest.raises(BootError, match="overlap"):
        elf.load(mem, write(tmp_path, img))


def test_entry_outside_segments(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4", 1)], entry=0x2000000)
    with pytest.raises(BootError, match="entry point"):
        elf.load(mem, write(tmp_path, img))


def test_no_load_segments(tmp_path, mem):
    note = struct.pack("<IIQQQQQQ", 4, 0, 0, 0, 0, 0, 0, 0)
    img = make_elf([], entry=0x1000000, extra_phdrs=[note])
    with pytest.raises(BootError, match="no PT_LOAD"):
        elf.load(mem, write(tmp_path, img))


# ---- load_kernel with an ELF ---------------------------------------------------------------

def _zp(mem, name):
    off, fmt = FIELDS[name]
    return struct.unpack_from(fmt, mem.read(layout.ZERO_PAGE_ADDR + off, struct.calcsize(fmt)))[0]


def test_load_kernel_elf_full(tmp_path, mem):
    img = make_elf([(0x1000000, 0xFFFFFFFF81000000, b"\xf4" * 32, 0x200000)], entry=0x1000000)
    initrd = b"070701" + bytes(5000)
    info = load_kernel(mem, write(tmp_path, img), "console=ttyS0 quiet", initrd, acpi_rsdp=0xE0000)
    assert (info.entry, info.boot_params_addr, info.kind) == (0x1000000, 0x7000, "elf")
    assert mem.read(layout.CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert _zp(mem, "hdr.cmd_line_ptr") == layout.CMDLINE_ADDR
    assert _zp(mem, "hdr.type_of_loader") == 0xFF
    assert _zp(mem, "hdr.boot_flag") == 0xAA55 and _zp(mem, "hdr.header") == 0x53726448
    assert _zp(mem, "acpi_rsdp_addr") == 0xE0000
    # initrd: page aligned, at the top of RAM, above the kernel
    addr, size = _zp(mem, "hdr.ramdisk_image"), _zp(mem, "hdr.ramdisk_size")
    assert size == len(initrd) and addr % 4096 == 0
    assert addr >= info.kernel_end and addr + size <= 64 * MiB and 64 * MiB - (addr + size) < 4096
    assert mem.read(addr, size) == initrd
    assert (info.initrd_addr, info.initrd_size) == (addr, size)
    n = _zp(mem, "e820_entries")
    table = mem.read(layout.ZERO_PAGE_ADDR + E820_TABLE_OFFSET, n * 20)
    assert [E820_ENTRY.unpack_from(table, i * 20) for i in range(n)][-1] == (0x100000, 63 * MiB, 1)
    # boot tables written too
    assert mem.read_u64(layout.PML4_ADDR) & ~0xFFF == layout.PDPT_ADDR
    assert mem.read_u64(layout.GDT_ADDR + 8) == 0x00AF9B000000FFFF


def test_load_kernel_without_initrd(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4", 1)], entry=0x1000000)
    info = load_kernel(mem, write(tmp_path, img), "", None)
    assert info.initrd_addr is None
    assert _zp(mem, "hdr.ramdisk_image") == 0 and _zp(mem, "hdr.ramdisk_size") == 0
    assert mem.read(layout.CMDLINE_ADDR, 1) == b"\0"


def test_cmdline_too_long(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4", 1)], entry=0x1000000)
    load_kernel(mem, write(tmp_path, img), "x" * 2047, None)           # exactly the limit: fine
    with pytest.raises(BootError, match="command line is 2048 bytes; the limit is 2047"):
        load_kernel(mem, write(tmp_path, img), "x" * 2048, None)


def test_cmdline_with_nul(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4", 1)], entry=0x1000000)
    with pytest.raises(BootError, match="NUL"):
        load_kernel(mem, write(tmp_path, img), "a\0b", None)


def test_initrd_too_big(tmp_path, mem):
    img = make_elf([(0x1000000, 0x1000000, b"\xf4", 8 * MiB)], entry=0x1000000)
    with pytest.raises(BootError, match="initrd of .* does not fit"):
        load_kernel(mem, write(tmp_path, img), "", bytes(56 * MiB))


def test_missing_kernel(tmp_path, mem):
    with pytest.raises(BootError, match="kernel image not found"):
        load_kernel(mem, tmp_path / "nope", "", None)


def test_kernel_is_directory(tmp_path, mem):
    with pytest.raises(BootError, match="directory"):
        load_kernel(mem, tmp_path, "", None)


@pytest.mark.parametrize("data", [b"", b"garbage" * 100, bytes(4096)])
def test_garbage_kernel(tmp_path, mem, data):
    with pytest.raises(BootError, match="neither an ELF vmlinux nor a bzImage"):
        load_kernel(mem, write(tmp_path, data), "", None)
