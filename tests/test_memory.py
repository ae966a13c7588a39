"""GuestMemory: regions and their backings, the hole split, bounds checks, little-endian accessors,
KVM registration."""

from __future__ import annotations

import mmap
import os

import pytest

import devices.memory
from devices.memory import GuestMemoryAccess
from vmm.memory import GuestMemory, GuestMemoryError, MemoryRegion, guest_ram, split_ram

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def mem():
    m = guest_ram(16 * MiB)
    yield m
    m.close()


def test_small_memory_is_one_region(mem):
    assert mem.size == 16 * MiB
    assert [(r.gpa, r.size) for r in mem.regions] == [(0, 16 * MiB)]
    assert mem.low_ram_end == 16 * MiB


def test_split_around_mmio_hole_without_touching_pages():
    m = guest_ram(4 * GiB + GiB // 2)       # MAP_NORESERVE mmaps: nothing is committed
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
        guest_ram(bad)


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
        m = guest_ram(3 * GiB + 64 * MiB)
        try:
            m.register(vm)                      # two slots, no overlap: KVM accepts both
            assert [r.slot for r in m.regions] == [0, 1]
        finally:
            vm.close()
            m.close()


def test_close_with_live_view_does_not_raise():
    m = guest_ram(1 * MiB)
    v = m.view(0, 16)
    m.close()                                   # logs; mapping lives on with the view
    v.release()



# ---- regions, backings, and the access interface --------------------------------------------------

def test_from_ranges_keeps_the_one_region_rule():
    m = GuestMemory.from_ranges([(0x20000, 0x10000), (0, 0x20000)])     # adjacent, given unsorted
    try:
        assert [(r.gpa, r.size, r.slot) for r in m.regions] == [(0, 0x20000, 0), (0x20000, 0x10000, 1)]
        assert m.size == 0x30000 and m.contains(0x1FFFC, 4) and m.contains(0x20000, 4)
        assert not m.contains(0x1FFFE, 4)          # touching regions are still two regions
        with pytest.raises(GuestMemoryError):
            m.view(0x1FFFE, 4)
        with pytest.raises(GuestMemoryError):
            m.read_u32(0x2FFFE)
    finally:
        m.close()


@pytest.mark.parametrize("ranges", [
    [],                                   # no memory at all
    [(0, 0x2000), (0x1000, 0x1000)],      # overlap
    [(0x800, 0x1000)],                    # base not page aligned
    [(0, 0x1800)],                        # size not a page multiple
    [(0, 0)],
    [(-0x1000, 0x1000)],
])
def test_bad_ranges_rejected(ranges):
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_ranges(ranges)


def test_size_is_not_regions():
    with pytest.raises(TypeError, match="guest_ram"):
        GuestMemory(16 * MiB)               # type: ignore[arg-type]


def test_guest_memory_is_the_device_access_interface(mem):
    assert isinstance(mem, GuestMemoryAccess)
    assert GuestMemoryError is devices.memory.GuestMemoryError


def _memfd_backing(size: int) -> mmap.mmap:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)                        # the mapping keeps the memory


def test_memfd_backing_shares_pages_with_another_mapping():
    # RAM another process can map (vhost-user): a shared backing instead of anonymous memory.
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x3000)
        backing = lambda size: mmap.mmap(fd, size, mmap.MAP_SHARED,  # noqa: E731
                                         mmap.PROT_READ | mmap.PROT_WRITE)
        with GuestMemory.from_ranges([(0, 0x3000)], backing=backing) as m:
            m.write(0x1234, b"shared")
            assert os.pread(fd, 6, 0x1234) == b"shared"
            os.pwrite(fd, b"back", 0x2000)
            assert m.read(0x2000, 4) == b"back"
    finally:
        os.close(fd)
    with GuestMemory.from_ranges([(0, 0x2000)], backing=_memfd_backing) as m:
        m.write_u64(0x1000, 7)
        assert m.read_u64(0x1000) == 7


def test_region_from_an_fd_at_an_offset():
    # What a vhost-user backend gets: (fd, offset, size) per region, placed at a guest address.
    fd = os.memfd_create("frontend-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x4000)
        os.pwrite(fd, b"second half", 0x2000)
        region = MemoryRegion(0x100000, mmap.mmap(fd, 0x2000, mmap.MAP_SHARED,
                                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=0x2000))
        with GuestMemory([region]) as m:
            assert m.read(0x100000, 11) == b"second half"
            assert not m.contains(0xFF000)
            assert m.regions[0].host_addr != 0
    finally:
        os.close(fd)


def test_close_is_idempotent():
    m = GuestMemory.from_ranges([(0, 0x1000)])
    m.close()
    m.close()
    assert m.regions[0].mapping.closed


def test_a_region_need_not_be_page_sized_but_vm_ram_must():
    # A peer-described region (vhost-user) is whatever the peer says; RAM we give KVM is whole pages.
    with GuestMemory([MemoryRegion(0x10, mmap.mmap(-1, 0x30))]) as m:
        m.write(0x3C, b"abcd")
        assert m.read(0x3C, 4) == b"abcd" and not m.contains(0x3D, 4) and not m.contains(0xC, 8)
    with pytest.raises(GuestMemoryError):
        MemoryRegion((1 << 64) - 0x10, mmap.mmap(-1, 0x20))


def test_map_memfd_regions_are_shareable_and_sealed():
    """RAM for a VM with a vhost-user device: each region keeps its memfd, which another process
    maps to see the same pages; the file cannot be resized under that peer."""
    import fcntl

    from devices.memory import map_memfd

    m = GuestMemory.from_ranges([(0, 0x4000), (0x100000, 0x2000)], backing=map_memfd)
    try:
        assert m.shareable and all(r.fd >= 0 and r.file_offset == 0 for r in m.regions)
        r1 = m.regions[1]
        peer = mmap.mmap(r1.fd, r1.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m.write(0x100010, b"guest")
        assert peer[0x10:0x15] == b"guest"
        peer[0x20:0x24] = b"peer"
        assert m.read(0x100020, 4) == b"peer"
        peer.close()
        with pytest.raises(OSError):
            os.ftruncate(r1.fd, 0x1000)
        with pytest.raises(OSError):
            os.ftruncate(r1.fd, 0x8000)
        seals = fcntl.fcntl(r1.fd, getattr(fcntl, "F_GET_SEALS", 1034))
        assert seals & getattr(fcntl, "F_SEAL_SHRINK", 2)
        fds = [r.fd for r in m.regions]
    finally:
        m.close()
    for fd in fds:                                    # the regions owned their fds
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(GuestMemoryError, match="closed"):
        m.read(0, 1)


def test_anonymous_ram_is_not_shareable(mem):
    assert not mem.shareable and all(r.fd == -1 for r in mem.regions)


def test_region_window_of_a_mapping():
    """A peer's region at an unaligned file offset: mapped from the page below, with a window."""
    mm = mmap.mmap(-1, 0x2000)
    mm[0x123:0x128] = b"hello"
    r = MemoryRegion(0x5000, mm, offset=0x123, size=0x1000)
    with GuestMemory([r]) as m:
        assert m.read(0x5000, 5) == b"hello" and m.regions[0].size == 0x1000
        assert not m.contains(0x5FFF, 2)
    with pytest.raises(GuestMemoryError, match="outside"):
        MemoryRegion(0, mmap.mmap(-1, 0x1000), offset=0x800, size=0x1000)
