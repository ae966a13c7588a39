"""Back-end guest memory: regions mmap'd from real memfds, bounds checks, user-address translation."""

from __future__ import annotations

import mmap
import os
import socket

import pytest

from devices.virtio.queue import Queue
from devices.memory import GuestMemoryError
from devices.virtio.vhost_user.memory import VhostUserMemory, validate_table
from devices.virtio.vhost_user.protocol import MemoryRegion
from tests.fakes import FakeDriverQueue
from tests.vhost_user_support import MemfdGuest

MiB = 1 << 20


@pytest.fixture
def guest():
    g = MemfdGuest([(0, 2 * MiB), (4 * MiB, 1 * MiB)])
    yield g
    g.close()


@pytest.fixture
def memory(guest):
    m = VhostUserMemory.from_table(guest.table(), guest.fds())
    yield m
    m.close()


def test_shared_both_ways(guest, memory):
    guest.write(0x1000, b"from the guest")
    assert memory.read(0x1000, 14) == b"from the guest"
    memory.write(4 * MiB + 16, b"from the back-end")
    assert guest.read(4 * MiB + 16, 17) == b"from the back-end"
    memory.write_u32(0x2000, 0xDEADBEEF)
    assert guest.read(0x2000, 4) == (0xDEADBEEF).to_bytes(4, "little")
    assert memory.read_u16(0x2000) == 0xBEEF and memory.read_u64(0x2000) == 0xDEADBEEF
    view = memory.view(0x3000, 8)
    view[:] = b"12345678"
    assert guest.read(0x3000, 8) == b"12345678"
    view.release()
    assert memory.ram_ranges() == [(0, 2 * MiB), (4 * MiB, MiB)]


@pytest.mark.parametrize("gpa, length", [
    (2 * MiB - 4, 8),          # crosses the end of region 0
    (2 * MiB, 1),              # the hole
    (3 * MiB, 16),             # the hole
    (5 * MiB - 1, 2),          # crosses the end of region 1
    (5 * MiB, 1),              # past everything
    (-1, 1),
    (0, -1),
    (1 << 64, 1),
])
def test_out_of_bounds(memory, gpa, length):
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)
    with pytest.raises(ValueError):
        memory.read(gpa, length)
    assert not memory.contains(gpa, max(length, 1)) or length < 0


def test_zero_length_and_value_range(memory):
    assert len(memory.view(0, 0)) == 0
    with pytest.raises(GuestMemoryError):
        memory.write_u16(0, 1 << 16)


def test_translate_user(guest, memory):
    assert memory.translate_user(guest.user_addr(0x1234), 16) == 0x1234
    assert memory.translate_user(guest.user_addr(4 * MiB + 8), 8) == 4 * MiB + 8
    with pytest.raises(GuestMemoryError, match="leaves region"):
        memory.translate_user(guest.user_addr(2 * MiB - 8), 16)
    with pytest.raises(GuestMemoryError, match="in no region"):
        memory.translate_user(0x1000, 8)  # never mapped in a process
    with pytest.raises(GuestMemoryError):
        memory.translate_user(-1, 8)


def test_it_is_a_guest_memory(memory):
    """The back-end's memory is the same GuestMemory class virtio-mmio devices run on."""
    from devices.memory import GuestMemory, GuestMemoryAccess
    assert isinstance(memory, GuestMemory) and isinstance(memory, GuestMemoryAccess)
    assert [(r.gpa, r.size) for r in memory.regions] == [(0, 2 * MiB), (4 * MiB, MiB)]
    assert not memory.shareable   # the fds were the front-end's; we keep only the mappings


def test_queue_runs_on_it(guest, memory):
    """The split-ring code takes this object where it takes GuestMemory."""
    drv = FakeDriverQueue(guest, 16, 0x10000, 0x20000)
    head, _ = drv.add_chain([b"request"], [64])
    q = Queue(memory, 16, drv.desc, drv.avail, drv.used, event_idx=True)
    chain = q.pop()
    assert chain.head == head and bytes(chain.readable[0]) == b"request"
    chain.writable[0][:5] = b"reply"
    q.add_used(head, 5)
    chain.release()
    q.close()
    assert drv.used_elems() == [(head, 5)]


def test_mmap_offset_unaligned():
    """Regions at arbitrary offsets of one file (QEMU sends mmap_offset for split RAM)."""
    g = MemfdGuest([(0, 64 * 1024), (1 << 20, 64 * 1024)], one_file=True, file_offset=123)
    try:
        m = VhostUserMemory.from_table(g.table(), g.fds())
        g.write((1 << 20) + 5, b"second")
        g.write(7, b"first")
        assert m.read((1 << 20) + 5, 6) == b"second" and m.read(7, 5) == b"first"
        m.close()
    finally:
        g.close()


def _region(gpa, size, user, off=0):
    return MemoryRegion(gpa, size, user, off)


@pytest.mark.parametrize("table, why", [
    ([_region(0, 0, 0x1000)], "empty"),
    ([_region((1 << 64) - 4096, 8192, 0x1000)], "guest range .* overflows"),
    ([_region(0, 8192, (1 << 64) - 4096)], "user range .* overflows"),
    ([_region(0, 8192, 0x1000, 1 << 63)], "mmap offset .* overflows"),
    ([_region(0, 8192, 0x10000), _region(4096, 8192, 0x20000)], "overlap in guest"),
    ([_region(0, 8192, 0x10000), _region(1 << 20, 8192, 0x11000)], "overlap in user"),
])
def test_bad_tables(table, why):
    with pytest.raises(GuestMemoryError, match=why):
        validate_table(table)


def test_fd_checks(tmp_path):
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(GuestMemoryError, match="shorter than"):
            VhostUserMemory.from_table([_region(0, 8192, 0x10000)], [fd])
        with pytest.raises(GuestMemoryError, match="shorter than"):
            VhostUserMemory.from_table([_region(0, 4096, 0x10000, 4096)], [fd])
        with pytest.raises(GuestMemoryError, match="1 regions but 2"):
            VhostUserMemory.from_table([_region(0, 4096, 0x10000)], [fd, fd])
    finally:
        os.close(fd)
    efd = os.eventfd(0)
    a, b = socket.socketpair()
    try:
        for bad in (efd, a.fileno()):
            with pytest.raises(GuestMemoryError, match="not a regular file"):
                VhostUserMemory.from_table([_region(0, 4096, 0x10000)], [bad])
        with pytest.raises(GuestMemoryError, match="bad file descriptor"):
            VhostUserMemory.from_table([_region(0, 4096, 0x10000)], [9999])
    finally:
        os.close(efd)
        a.close()
        b.close()


def test_failed_table_unmaps_what_it_mapped():
    good = os.memfd_create("good", os.MFD_CLOEXEC)
    os.ftruncate(good, 1 << 20)
    small = os.memfd_create("small", os.MFD_CLOEXEC)
    try:
        before = _maps_of(good)
        with pytest.raises(GuestMemoryError):
            VhostUserMemory.from_table([_region(0, 1 << 20, 0x100000), _region(2 << 20, 4096, 0x900000)],
                                       [good, small])
        assert _maps_of(good) == before
    finally:
        os.close(good)
        os.close(small)


def _maps_of(fd: int) -> int:
    ino = os.fstat(fd).st_ino
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.split()[4] == str(ino) and "memfd:" in line)


def test_close_unmaps_and_refuses_access(guest):
    m = VhostUserMemory.from_table(guest.table(), guest.fds())
    ino = os.fstat(guest.fds()[0]).st_ino
    assert _maps_of(guest.fds()[0]) == 2  # the guest's own mapping and ours
    m.close()
    assert _maps_of(guest.fds()[0]) == 1
    with pytest.raises(GuestMemoryError, match="closed"):
        m.read(0, 1)
    assert ino
    m.close()  # idempotent


def test_regions_need_not_be_page_sized():
    g = MemfdGuest([(0, 5000)])
    try:
        m = VhostUserMemory.from_table(g.table(), g.fds())
        m.write(4999, b"x")
        with pytest.raises(GuestMemoryError):
            m.write(4999, b"xy")
        assert g.read(4999, 1) == b"x"
        m.close()
    finally:
        g.close()
    assert mmap.PAGESIZE == 4096
