"""Test doubles for objects that only exist inside a running VM.

`FakeGuestMemory` has the same methods as `vmm.memory.GuestMemory` (see spec.md) but is backed by
bytearrays instead of an mmap registered with KVM, so device and FUSE code can be driven without a
guest. It keeps the real one's rule that an access must lie inside ONE region, so code that forgets
to check region boundaries fails here too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class FakeGuestMemoryError(ValueError):
    """Out-of-range or region-crossing access (a ValueError, like vmm.memory.GuestMemoryError)."""


@dataclass
class FakeRegion:
    gpa: int
    size: int
    mmap: bytearray


class FakeGuestMemory:
    """Guest RAM over bytearrays.

    `FakeGuestMemory(size)` is one region at gpa 0; `FakeGuestMemory(regions=[(gpa, size), ...])`
    builds several (e.g. to test accesses that straddle a hole or a region boundary).
    """

    def __init__(self, size: int = 0, *, regions: list[tuple[int, int]] | None = None) -> None:
        if regions is None:
            regions = [(0, size)]
        self.regions: list[FakeRegion] = []
        for gpa, rsize in sorted(regions):
            if self.regions and gpa < self.regions[-1].gpa + self.regions[-1].size:
                raise ValueError("overlapping regions")
            self.regions.append(FakeRegion(gpa, rsize, bytearray(rsize)))
        self.size = sum(r.size for r in self.regions)

    def _locate(self, gpa: int, length: int) -> tuple[FakeRegion, int]:
        if gpa < 0 or length < 0:
            raise FakeGuestMemoryError(f"bad access gpa={gpa:#x} len={length}")
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                return region, gpa - region.gpa
        raise FakeGuestMemoryError(f"access gpa={gpa:#x} len={length} outside guest memory")

    def view(self, gpa: int, length: int) -> memoryview:
        region, off = self._locate(gpa, length)
        return memoryview(region.mmap)[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        region, off = self._locate(gpa, length)
        return bytes(region.mmap[off:off + length])

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        data = bytes(data)
        region, off = self._locate(gpa, len(data))
        region.mmap[off:off + len(data)] = data

    def _unpack(self, fmt: str, gpa: int) -> int:
        region, off = self._locate(gpa, struct.calcsize(fmt))
        return struct.unpack_from(fmt, region.mmap, off)[0]

    def _pack(self, fmt: str, gpa: int, value: int) -> None:
        region, off = self._locate(gpa, struct.calcsize(fmt))
        struct.pack_into(fmt, region.mmap, off, value)

    def read_u16(self, gpa: int) -> int:
        return self._unpack("<H", gpa)

    def read_u32(self, gpa: int) -> int:
        return self._unpack("<I", gpa)

    def read_u64(self, gpa: int) -> int:
        return self._unpack("<Q", gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self._pack("<H", gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._pack("<I", gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._pack("<Q", gpa, value)
