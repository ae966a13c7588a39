"""GuestMemory: the hole split, bounds checks, little-endian accessors, KVM registration."""

from __future__ import annotations

import os

import pytest

from vmm.memory import GuestMemory, GuestMemoryError, split_ram

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def test_small_memory_is_one_region(mem):
    assert mem.size == 16 * MiB
    assert [(r.gpa, r.size) for r in mem.regions] == [(0, 16 * MiB)]
    assert mem.low_ram_end == 16 * MiB


def test_split_around_mmio_hole_without_touching_pages():
    m = GuestMemory(4 * GiB + GiB // 2)       # MAP_NORESERVE mmaps: nothing is committed
    try:
        assert [(r.gpa, r.size) for r in m.regions] == [(0, 3 * GiB), (4 * GiB, 1 * GiB + GiB // 2)]
        assert m.size == sum(r.size for r in m.regions)
        assert m.contains(3 * GiB - 8, 8)
        assert not m.contains(3 * GiB - 4, 8)           # crosses into the hole
        assert not m.contains(3 * GiB + 4, 4)           # in the hole
        assert m.contains(4 * GiB, 4)
        assert not m.contains(4 * GiB + GiB + GiB // 2 - 4, 8)   # past the end
        with pytest.raises(GuestMemoryError):
            m.view(3 * GiB - 2, 4)
        m.write_u32(4 * GiB + 16, 0xCAFEBABE)           # touches exactly one high page
        assert m.read_u32(4 * GiB + 16) == 0xCAFEBABE
        assert m.host_address(4 * GiB) == m.regions[1].host_addr
    finally:
        m.close()


@pytest.mark.parametrize("size,expected", [
    (3 * GiB, [(0, 3 * GiB)]),
    (3 * GiB + 4096, [(0, 3 * GiB), (4 * GiB, 4096)]),
    (128 * MiB, [(0, 128 * MiB)]),
])
def test_split_ram(size, expected):
    assert split_ram(size) == expected


@pytest.mark.parametrize("bad", [0, -4096, 4097, 1.5])
def test_bad_sizes_rejected(bad):
    with pytest.raises(GuestMemoryError):
        GuestMemory(bad)


def test_errors_are_value_errors():
    assert issubclass(GuestMemoryError, ValueError)


def test_little_endian_accessors(mem):
    mem.write_u64(0x1000, 0x0102030405060708)
    assert mem.read(0x1000, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert mem.read_u16(0x1000) == 0x0708
    assert mem.read_u32(0x1004) == 0x01020304
    mem.write_u16(0x2000, 0xBEEF)
    mem.write_u32(0x2002, 0x11223344)
    assert mem.read(0x2000, 6) == b"\xef\xbe\x44\x33\x22\x11"
    assert mem.read_u64(0x1000) == 0x0102030405060708


def test_value_too_large_rejected(mem):
    with pytest.raises(GuestMemoryError):
        mem.write_u16(0, 0x10000)
    with pytest.raises(GuestMemoryError):
        mem.write_u32(0, -1)


@pytest.mark.parametrize("gpa,length", [
    (-1, 1), (0, -1), (16 * MiB, 1), (16 * MiB - 1, 2), (1 << 64, 1), (0, 16 * MiB + 1),
])
def test_out_of_range_views(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)


@pytest.mark.parametrize("reader", ["read_u16", "read_u32", "read_u64"])
def test_int_reads_at_the_end_are_checked(mem, reader):
    with pytest.raises(GuestMemoryError):
        getattr(mem, reader)(16 * MiB - 1)


def test_write_bounds(mem):
    with pytest.raises(GuestMemoryError):
        mem.write(16 * MiB - 2, b"abc")
    mem.write(16 * MiB - 3, b"abc")
    assert mem.read(16 * MiB - 3, 3) == b"abc"


def test_zero_length_is_ok(mem):
    assert len(mem.view(16 * MiB, 0)) == 0
    assert mem.read(5 * GiB, 0) == b""
    mem.write(16 * MiB, b"")


def test_view_is_writable_and_shared(mem):
    v = mem.view(0x3000, 4)
    v[:] = b"wxyz"
    assert mem.read(0x3000, 4) == b"wxyz"
    mem.write(0x3001, memoryview(b"Q"))
    assert bytes(v) == b"wQyz"
    v.release()


def test_write_accepts_non_byte_memoryviews(mem):
    import array
    mem.write(0x100, memoryview(array.array("I", [1, 2])))
    assert mem.read(0x100, 8) == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_ram_ranges(mem):
    assert mem.ram_ranges() == [(0, 16 * MiB)]


@pytest.mark.skipif(not os.path.exists("/dev/kvm"),
                    reason="!!! /dev/kvm is absent: KVM slot registration cannot be tested !!!")
def test_register_with_kvm():
    from kvm_sys import Kvm
    with Kvm() as kvm:
        vm = kvm.create_vm()
        m = GuestMemory(3 * GiB + 64 * MiB)
        try:
            m.register(vm)                      # two slots, no overlap: KVM accepts both
            assert [r.slot for r in m.regions] == [0, 1]
        finally:
            vm.close()
            m.close()


def test_close_with_live_view_does_not_raise():
    m = GuestMemory(1 * MiB)
    v = m.view(0, 16)
    m.close()                                   # logs; mapping lives on with the view
    v.release()

