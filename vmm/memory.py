"""Guest RAM as the VMM lays it out: from 0 up to the 32-bit MMIO hole, the rest above 4 GiB.

The memory itself (regions over host mappings, bounds-checked access, KVM slot registration) is
``devices.memory.GuestMemory``, which device code -- including a vhost-user backend without a VMM --
shares; this module only decides where the VMM's RAM goes (``vmm.layout``) and re-exports the names
the VMM uses.
"""

from __future__ import annotations

from devices.memory import (PAGE_SIZE, Backing, GuestMemory, GuestMemoryError, MemoryRegion,
                            map_anonymous, map_memfd)

from . import layout

__all__ = ["Backing", "GuestMemory", "GuestMemoryError", "MemoryRegion", "PAGE_SIZE", "guest_ram",
           "map_anonymous", "map_memfd", "split_ram"]


def split_ram(size: int) -> list[tuple[int, int]]:
    """(gpa, size) pieces of ``size`` bytes of RAM around the [3 GiB, 4 GiB) MMIO hole."""
    low = min(size, layout.MMIO_HOLE_START)
    pieces = [(0, low)]
    if size > low:
        pieces.append((layout.HIGH_RAM_START, size - low))
    return pieces


def guest_ram(size: int, backing: Backing = map_anonymous, *, shared: bool = False) -> GuestMemory:
    """Guest RAM of ``size`` bytes (page multiple), split around the 32-bit MMIO hole.

    ``shared=True``: each region a sealed memfd mapped MAP_SHARED (``map_memfd``), which a
    vhost-user back-end can map. The VMM asks for it only when a vhost-user device exists: private
    anonymous RAM stays eligible for transparent huge pages and KSM (shmem is not, by default),
    and no descriptor that opens the whole of guest RAM exists unless a peer needs one."""
    if shared:
        backing = map_memfd
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise GuestMemoryError(f"guest memory size must be a positive integer, got {size!r}")
    if size % PAGE_SIZE:
        raise GuestMemoryError(f"guest memory size {size:#x} is not a multiple of {PAGE_SIZE:#x}")
    return GuestMemory.from_ranges(split_ram(size), backing)
