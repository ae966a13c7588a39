"""bzImage loading on synthetic images with a real setup header layout (boot protocol 2.15)."""

from __future__ import annotations

import struct

import pytest

from vmm import layout
from vmm.boot import BootError, bzimage, load_kernel
from vmm.boot.bootparams import FIELDS

MiB = 1 << 20


def make_bzimage(*, setup_sects=4, version=0x020F, loadflags=0x01, xloadflags=0x03, relocatable=1,
                 pref_address=0x1000000, code32_start=0x100000, init_size=0x800000,
                 initrd_addr_max=0x7FFFFFFF, cmdline_size=2047, header=b"HdrS", boot_flag=0xAA55,
                 pm_code: bytes = b"\x90" * 0x200 + b"\xf4" * 16) -> bytes:
    """A bzImage: (setup_sects + 1) sectors of real-mode setup, then the protected-mode code."""
    setup = bytearray((setup_sects + 1) * 512)

    def put(name, value):
        off, fmt = FIELDS[f"hdr.{name}"]
        struct.pack_into(fmt, setup, off, value)

    put("setup_sects", setup_sects)
    put("boot_flag", boot_flag)
    put("jump", 0x66EB)                          # jmp over the header, as the real one starts
    setup[0x202:0x206] = header
    put("version", version)
    put("type_of_loader", 0)
    put("loadflags", loadflags)
    put("code32_start", code32_start)
    put("initrd_addr_max", initrd_addr_max)
    put("kernel_alignment", 0x200000)
    put("relocatable_kernel", relocatable)
    put("min_alignment", 21)
    put("xloadflags", xloadflags)
    put("cmdline_size", cmdline_size)
    put("pref_address", pref_address)
    put("init_size", init_size)
    setup[0x201] = 0x6A                          # header length byte: ends at 0x26C (v2.15)
    return bytes(setup) + pm_code


@pytest.fixture
def mem():
    from vmm.memory import guest_ram
    m = guest_ram(64 * MiB)
    yield m
    m.close()


def write(tmp_path, data):
    p = tmp_path / "bzImage"
    p.write_bytes(data)
    return p


def test_relocatable_loads_at_pref_address(tmp_path, mem):
    pm = bytes(range(256)) * 8
    b = bzimage.load(mem, write(tmp_path, make_bzimage(pm_code=pm)))
    assert b.load_addr == 0x1000000 and b.entry == 0x1000200
    assert mem.read(0x1000000, len(pm)) == pm
    assert b.end == 0x1000000 + 0x800000              # init_size, not just the file
    assert b.version == 0x020F and b.cmdline_max == 2047


def test_setup_sects_zero_means_four(tmp_path, mem):
    pm = b"\xcc" * 700
    img = bytearray(make_bzimage(setup_sects=4, pm_code=pm))
    img[0x1F1] = 0
    b = bzimage.load(mem, write(tmp_path, bytes(img)))
    assert mem.read(b.load_addr, len(pm)) == pm


def test_non_relocatable_loads_at_code32_start(tmp_path, mem):
    b = bzimage.load(mem, write(tmp_path, make_bzimage(relocatable=0, code32_start=0x200000)))
    assert b.load_addr == 0x200000 and b.entry == 0x200200


def test_setup_sects_respected(tmp_path, mem):
    pm = b"PMCODE" * 100
    b = bzimage.load(mem, write(tmp_path, make_bzimage(setup_sects=30, pm_code=pm)))
    assert mem.read(b.load_addr, len(pm)) == pm


@pytest.mark.parametrize("kwargs,msg", [
    ({"version": 0x020B}, "too old"),
    ({"loadflags": 0}, "LOADED_HIGH"),
    ({"xloadflags": 0}, "XLF_KERNEL_64"),
    ({"boot_flag": 0x1234}, "boot_flag"),
    ({"init_size": 60 * MiB}, "needs guest RAM"),
    ({"relocatable": 0, "code32_start": 0x7000}, "below 1 MiB"),
])
def test_rejected_images(tmp_path, mem, kwargs, msg):
    with pytest.raises(BootError, match=msg):
        bzimage.load(mem, write(tmp_path, make_bzimage(**kwargs)))


def test_no_protected_mode_code(tmp_path, mem):
    with pytest.raises(BootError, match="no protected-mode kernel"):
        bzimage.load(mem, write(tmp_path, make_bzimage(pm_code=b"")))


def test_truncated_file(tmp_path, mem):
    with pytest.raises(BootError):
        bzimage.load(mem, write(tmp_path, make_bzimage()[:0x250]))


def _zp(mem, name):
    off, fmt = FIELDS[name]
    return struct.unpack_from(fmt, mem.read(layout.ZERO_PAGE_ADDR + off, struct.calcsize(fmt)))[0]


def test_load_kernel_bzimage_zero_page(tmp_path, mem):
    img = make_bzimage(initrd_addr_max=0x1FFFFFF)     # initrd must end at or below 32 MiB
    initrd = b"I" * 10000
    info = load_kernel(mem, write(tmp_path, img), "console=ttyS0", initrd)
    assert info.kind == "bzimage" and info.entry == 0x1000200
    # The image's header was copied, then our loader fields set.
    assert _zp(mem, "hdr.version") == 0x020F
    assert _zp(mem, "hdr.pref_address") == 0x1000000
    assert _zp(mem, "hdr.init_size") == 0x800000
    assert _zp(mem, "hdr.type_of_loader") == 0xFF
    assert _zp(mem, "hdr.cmd_line_ptr") == layout.CMDLINE_ADDR
    addr = _zp(mem, "hdr.ramdisk_image")
    # kernel occupies [16 MiB, 24 MiB) (init_size); initrd below initrd_addr_max, above the kernel
    assert addr + len(initrd) - 1 <= 0x1FFFFFF and addr >= 0x1800000 and addr % 4096 == 0
    assert mem.read(addr, len(initrd)) == initrd


def test_initrd_addr_max_too_low_for_initrd(tmp_path, mem):
    img = make_bzimage(initrd_addr_max=0x1900000)      # only 1 MiB above the kernel's init_size
    with pytest.raises(BootError, match="initrd"):
        load_kernel(mem, write(tmp_path, img), "", bytes(2 * MiB))


def test_cmdline_limit_from_header(tmp_path, mem):
    img = make_bzimage(cmdline_size=255)
    load_kernel(mem, write(tmp_path, img), "a" * 255, None)
    with pytest.raises(BootError, match="limit is 255"):
        load_kernel(mem, write(tmp_path, img), "a" * 256, None)
