"""Port-I/O and MMIO dispatch: find the device whose range holds an address and forward the access.

Each vCPU exit for an I/O port or an unbacked guest-physical address lands here. Devices see offsets
relative to their base. An access nobody claims reads as all ones (what an empty ISA/PCI bus returns)
and is logged once per address at debug level, so a chatty probe does not flood the log.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass

from devices.bus_device import BusDevice
from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)


class BusError(ValueError):
    """A device range that overlaps another or is empty: a VMM bug, caught at assembly time."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice
    name: str
    lock: threading.Lock

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._log = LogThrottle(logger)
        self.unclaimed_accesses = 0

    def insert(self, base: int, length: int, device: BusDevice, name: str) -> None:
        if length <= 0:
            raise BusError(f"{self.name} bus: {name}: empty range")
        i = bisect.bisect_right(self._bases, base)
        for neighbour in self._ranges[max(0, i - 1):i + 1]:
            if base < neighbour.end and neighbour.base < base + length:
                raise BusError(f"{self.name} bus: {name} [{base:#x}, {base + length:#x}) overlaps "
                               f"{neighbour.name} [{neighbour.base:#x}, {neighbour.end:#x})")
        # One lock per device: several vCPUs may touch the same device; devices stay simple.
        self._ranges.insert(i, BusRange(base, length, device, name, threading.Lock()))
        self._bases.insert(i, base)

    def find(self, addr: int) -> BusRange | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.end:
                return r
        return None

    def read(self, addr: int, size: int) -> bytes:
        r = self.find(addr)
        if r is None or addr + size > r.end:
            self._unclaimed(addr, size, "read")
            return b"\xff" * size
        with r.lock:
            data = r.device.read(addr - r.base, size)
        if len(data) != size:   # a device bug must not corrupt the vCPU's view
            data = (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> None:
        r = self.find(addr)
        if r is None or addr + len(data) > r.end:
            self._unclaimed(addr, len(data), "write")
            return
        with r.lock:
            r.device.write(addr - r.base, data)

    def _unclaimed(self, addr: int, size: int, what: str) -> None:
        self.unclaimed_accesses += 1
        self._log.once(addr, logging.DEBUG, "%s bus: unclaimed %d-byte %s at %#x (further ones not logged)",
                       self.name, size, what, addr)
