"""Test doubles for the guest side of a VM: a virtio driver's queues and its MMIO register accesses.

Guest memory is not faked: tests use the real `devices.memory.GuestMemory` built with
`GuestMemory.from_ranges([(gpa, size), ...])` (anonymous mmaps, no KVM), so device code is checked
against the same bounds rules it meets in a VM.
"""

from __future__ import annotations

import struct

from devices.memory import GuestMemoryAccess


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class FakeDriverQueue:
    """Plays the guest driver's half of a split virtqueue inside guest memory.

    Lays out the rings at `base`, hands out data buffers from a bump heap at `heap`, and publishes
    chains on the available ring the way Linux's virtio_ring does, so device code can be exercised
    exactly as a guest would drive it. `add_raw` writes arbitrary (possibly malformed) descriptors.
    """

    def __init__(self, memory: GuestMemoryAccess, size: int, base: int, heap: int) -> None:
        self.memory = memory
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = _align(self.avail + 6 + 2 * size, 4)
        self.end = self.used + 6 + 8 * size
        self.heap = heap
        self.avail_idx = 0
        self.next_desc = 0

    def reset(self) -> None:
        """Forget everything, as a driver re-initialising the rings after a device reset does."""
        self.memory.write(self.desc, bytes(self.end - self.desc))
        self.avail_idx = 0
        self.next_desc = 0

    # -- buffers ------------------------------------------------------------------------------
    def alloc(self, data: bytes | int) -> int:
        """Place `data` (or reserve `data` zero bytes) in the heap; returns its guest address."""
        if isinstance(data, int):
            data = bytes(data)
        gpa = self.heap
        self.memory.write(gpa, data)
        self.heap = _align(self.heap + len(data), 16)
        return gpa

    def _alloc_desc_index(self) -> int:
        idx = self.next_desc % self.size
        self.next_desc += 1
        return idx

    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    # -- publishing ---------------------------------------------------------------------------
    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def add_chain(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> tuple[int, list[int]]:
        """Publish a chain; returns (head, guest addresses of the writable buffers)."""
        bufs = [(self.alloc(r), len(r), 0) for r in readable]
        out_addrs = []
        for w in writable:
            gpa = self.alloc(w)
            out_addrs.append(gpa)
            bufs.append((gpa, w, 2))
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (addr, length, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(table, i, addr, length, flags | (0 if last else 1), 0 if last else i + 1)
            head = self._alloc_desc_index()
            self.write_desc(self.desc, head, table, 16 * len(bufs), 4, 0)
        else:
            indices = [self._alloc_desc_index() for _ in bufs]
            for i, (addr, length, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(self.desc, indices[i], addr, length, flags | (0 if last else 1),
                                0 if last else indices[i + 1])
            head = indices[0]
        self.publish(head)
        return head, out_addrs

    def add_raw(self, descs: dict[int, tuple[int, int, int, int]], head: int) -> None:
        """Write descriptors {index: (addr, len, flags, next)} into the table and publish `head`."""
        for index, (addr, length, flags, nxt) in descs.items():
            self.write_desc(self.desc, index, addr, length, flags, nxt)
        self.publish(head)

    # -- device's output ----------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def used_elems(self) -> list[tuple[int, int]]:
        """All (id, len) elements the device has published so far (up to one ring's worth)."""
        n = self.used_idx()
        first = max(0, n - self.size)
        return [struct.unpack("<II", self.memory.read(self.used + 4 + 8 * (i % self.size), 8))
                for i in range(first, n)]

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)


# virtio_config.h status bits, repeated here so the fake driver does not depend on device code
_ACK, _DRIVER, _DRIVER_OK, _FEATURES_OK = 1, 2, 4, 8


class MmioDriver:
    """Does what Linux's virtio_mmio.c does, through 32-bit MMIO accesses."""

    def __init__(self, t) -> None:
        self.t = t

    def r(self, off: int) -> int:
        return struct.unpack("<I", self.t.read(off, 4))[0]

    def w(self, off: int, value: int) -> None:
        self.t.write(off, struct.pack("<I", value))

    def device_features(self) -> int:
        self.w(0x14, 0)
        low = self.r(0x10)
        self.w(0x14, 1)
        return low | self.r(0x10) << 32

    def set_driver_features(self, features: int) -> None:
        self.w(0x24, 0)
        self.w(0x20, features & 0xFFFFFFFF)
        self.w(0x24, 1)
        self.w(0x20, features >> 32)

    def negotiate(self, features: int) -> int:
        self.w(0x70, 0)
        self.w(0x70, _ACK)
        self.w(0x70, _ACK | _DRIVER)
        self.set_driver_features(features)
        self.w(0x70, _ACK | _DRIVER | _FEATURES_OK)
        return self.r(0x70)

    def setup_queue(self, i: int, size: int, desc: int, avail: int, used: int) -> None:
        self.w(0x30, i)
        self.w(0x38, size)
        for off, addr in ((0x80, desc), (0x90, avail), (0xA0, used)):
            self.w(off, addr & 0xFFFFFFFF)
            self.w(off + 4, addr >> 32)
        self.w(0x44, 1)

    def bring_up(self, features: int | None = None, sizes=(16, 8), queues=None) -> int:
        """Negotiate, set up queues (FakeDriverQueues, or default layouts of `sizes`), DRIVER_OK."""
        features = self.device_features() if features is None else features
        self.negotiate(features)
        if queues is not None:
            for i, q in enumerate(queues):
                self.setup_queue(i, q.size, q.desc, q.avail, q.used)
        else:
            for i, size in enumerate(sizes):
                base = 0x1000 + i * 0x2000
                self.setup_queue(i, size, base, base + 0x400, base + 0x800)
        self.w(0x70, _ACK | _DRIVER | _FEATURES_OK | _DRIVER_OK)
        return self.r(0x70)
