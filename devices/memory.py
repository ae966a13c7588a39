"""Guest memory as devices see it: the access interface, and the mmap-backed implementation.

Devices (virtqueues, descriptor chains, the virtio transports) and the VMM's boot and ACPI code take
addresses straight from the guest, so each access names a guest-physical range and the memory checks
it: a range must lie inside ONE region, otherwise ``GuestMemoryError`` (a ``ValueError``, which
device code catches and turns into an error reply or a dropped request). Reads and writes go through
memoryviews / ``struct.unpack_from`` on the mapping, so the only copy is the one the caller asks for.

``GuestMemoryAccess`` is that interface; device code is typed against it. ``GuestMemory`` implements
it in three separate steps, so each can change without the others:

1. a *backing* makes the host mapping of one region: ``map_anonymous`` (private anonymous memory
   with ``MAP_NORESERVE``: the host commits a page only when it is touched) or ``map_memfd`` (a
   sealed memfd mapped ``MAP_SHARED``, which another process can map too: the region keeps the fd,
   so a vhost-user front-end can send it to its back-end);
2. ``MemoryRegion(gpa, mapping)`` places a mapping (or a window of one) at a guest-physical address;
3. ``GuestMemory(regions)`` checks the regions do not overlap and serves bounds-checked access.

``GuestMemory.from_ranges([(gpa, size), ...], backing=...)`` does all three for RAM the process maps
itself; it needs only mmap, so unit tests use the real class. ``register(vm)`` (KVM memory slots) is a
separate call the VMM makes. A vhost-user back-end, which receives (fd, offset, size) per region from
its front-end, builds ``MemoryRegion(gpa, mmap(fd, ...), offset=..., size=...)`` per region
(``devices.virtio.vhost_user.memory``) and keeps the front-end's user address beside each one to
translate ring addresses.

This lives below the VMM (layers point downward: vmm -> devices) so that device code -- including a
vhost-user backend, which has no VMM -- can use it; ``vmm.memory`` adds the VMM's RAM layout.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Backing", "FileMapping", "GuestMemory", "GuestMemoryAccess", "GuestMemoryError",
           "MemoryRegion", "PAGE_SIZE", "map_anonymous", "map_memfd"]

logger = logging.getLogger(__name__)



class GuestMemoryError(ValueError):
    """An out-of-range or region-crossing guest memory access."""


@runtime_checkable
class GuestMemoryAccess(Protocol):
    """Bounds-checked access to guest-physical memory; every method raises ``GuestMemoryError``
    for a range that is not inside one region. Integers are little-endian (the guest is x86)."""

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if [gpa, gpa + length) lies inside one region."""
        ...

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa + length): no copy; the guest may change it at any time."""
        ...

    def read(self, gpa: int, length: int) -> bytes:
        """A private copy of [gpa, gpa + length) (use it for data that must not change under you)."""
        ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        ...

    def read_u16(self, gpa: int) -> int:
        ...

    def read_u32(self, gpa: int) -> int:
        ...

    def read_u64(self, gpa: int) -> int:
        ...

    def write_u16(self, gpa: int, value: int) -> None:
        ...

    def write_u32(self, gpa: int, value: int) -> None:
        ...

    def write_u64(self, gpa: int, value: int) -> None:
        ...


PAGE_SIZE = 0x1000
GPA_LIMIT = 1 << 64

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class FileMapping:
    """What a shareable backing returns: ``mapping`` shows ``len(mapping)`` bytes of the file ``fd``
    from ``offset`` on. The region made from it owns ``fd`` (and closes it)."""

    mapping: mmap.mmap
    fd: int
    offset: int = 0


#: Makes a fresh read/write host mapping of ``size`` bytes for one region.
Backing = Callable[[int], "mmap.mmap | FileMapping"]

_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
#: No shrinking (a peer's mapping past the end would fault), no growing, no further seal changes.
_RAM_SEALS = (getattr(fcntl, "F_SEAL_SHRINK", 0x2) | getattr(fcntl, "F_SEAL_GROW", 0x4)
              | getattr(fcntl, "F_SEAL_SEAL", 0x1))


def map_anonymous(size: int) -> mmap.mmap:
    """Private anonymous memory, committed page by page on first touch."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                     | getattr(mmap, "MAP_NORESERVE", 0), prot=mmap.PROT_READ | mmap.PROT_WRITE)


def map_memfd(size: int) -> FileMapping:
    """A memfd of ``size`` bytes mapped ``MAP_SHARED``: RAM another process (a vhost-user back-end)
    can map from the fd. Sealed against shrinking and growing, as QEMU's memory-backend-memfd is, so
    a peer that mapped it can rely on its size. Pages are allocated on first touch (memfd_create
    sets up its file with VM_NORESERVE), like ``map_anonymous``'s."""
    fd = os.memfd_create("pyvmm-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, _F_ADD_SEALS, _RAM_SEALS)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return FileMapping(mapping, fd)


def _check_pages(gpa: int, size: int) -> None:
    """RAM the process maps for a VM goes to KVM, which takes whole pages only."""
    if gpa < 0 or gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE or gpa + size > GPA_LIMIT:
        raise GuestMemoryError(f"region [{gpa:#x}, +{size:#x}) is not a non-empty run of "
                               f"{PAGE_SIZE:#x}-byte pages")


def _host_address(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)   # a temporary export, just to read the address
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class MemoryRegion:
    """``size`` bytes of guest-physical memory at ``gpa``: bytes [offset, offset + size) of the host
    mapping ``mapping`` (all of it by default), which the region owns and unmaps in ``close()``.
    ``slot`` is set by ``GuestMemory``. No page rule here: a region described by a peer need not be
    page-sized or start on a page of its file (the back-end maps from the page below and passes
    ``offset``); RAM made by ``GuestMemory.from_ranges`` is page-sized, because KVM needs it.

    ``fd``/``file_offset``: the file behind a shareable mapping (the region owns ``fd`` and closes
    it), or -1 for anonymous memory. A vhost-user front-end sends them in SET_MEM_TABLE."""

    __slots__ = ("gpa", "size", "mapping", "offset", "host_addr", "slot", "fd", "file_offset", "_view")

    def __init__(self, gpa: int, mapping: mmap.mmap, *, offset: int = 0, size: int | None = None,
                 fd: int = -1, file_offset: int = 0) -> None:
        if size is None:
            size = len(mapping) - offset
        if offset < 0 or size < 0 or offset + size > len(mapping):
            raise GuestMemoryError(f"region window [{offset:#x}, +{size:#x}) is outside its "
                                   f"{len(mapping):#x}-byte mapping")
        if gpa < 0 or size == 0 or gpa + size > GPA_LIMIT:
            raise GuestMemoryError(f"region [{gpa:#x}, +{size:#x}) is empty or outside 64 bits")
        self.gpa = gpa
        self.size = size
        self.mapping = mapping
        self.offset = offset
        # userspace address, for KVM_SET_USER_MEMORY_REGION and vhost-user's ring addresses
        self.host_addr = _host_address(mapping) + offset
        self.slot = 0
        self.fd = fd
        self.file_offset = file_offset
        self._view: memoryview | None = memoryview(mapping)[offset:offset + size]

    @classmethod
    def backed(cls, gpa: int, made: mmap.mmap | FileMapping) -> MemoryRegion:
        """A region from what a ``Backing`` returned."""
        if isinstance(made, FileMapping):
            return cls(gpa, made.mapping, fd=made.fd, file_offset=made.offset)
        return cls(gpa, made)

    @property
    def shareable(self) -> bool:
        """True if another process can map this region's pages (it has a file behind it)."""
        return self.fd >= 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def __repr__(self) -> str:
        return f"MemoryRegion([{self.gpa:#x}, {self.end:#x}), slot {self.slot})"

    def close(self) -> None:
        """Unmap; views still held elsewhere keep the mapping alive (logged). Idempotent."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.mapping.close()
        except BufferError:
            logger.warning("guest memory region at %#x still has live views; left mapped", self.gpa)


class GuestMemory:
    """Guest-physical memory made of non-overlapping regions (implements ``GuestMemoryAccess``).

    Takes ownership of ``regions``: ``close()`` unmaps them (also when construction fails).
    """

    def __init__(self, regions: Iterable[MemoryRegion]) -> None:
        if isinstance(regions, int):
            raise TypeError("GuestMemory takes regions; use vmm.memory.guest_ram(size) for RAM of a size")
        self.regions: list[MemoryRegion] = sorted(regions, key=lambda r: r.gpa)
        try:
            if not self.regions:
                raise GuestMemoryError("guest memory needs at least one region")
            for prev, r in zip(self.regions, self.regions[1:]):
                if r.gpa < prev.end:
                    raise GuestMemoryError(f"regions {prev!r} and {r!r} overlap")
        except BaseException:
            self.close()
            raise
        for slot, r in enumerate(self.regions):
            r.slot = slot
        self.size = sum(r.size for r in self.regions)
        logger.debug("guest memory: %s", ", ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in self.regions))

    @classmethod
    def from_ranges(cls, ranges: Sequence[tuple[int, int]], backing: Backing = map_anonymous
                    ) -> GuestMemory:
        """One region per (gpa, size), each mapped by ``backing`` (anonymous memory by default)."""
        regions: list[MemoryRegion] = []
        try:
            for gpa, size in ranges:
                _check_pages(gpa, size)         # before mapping anything for it
                regions.append(MemoryRegion.backed(gpa, backing(size)))
        except BaseException:
            for r in regions:
                r.close()
            raise
        return cls(regions)

    # ---- KVM ----------------------------------------------------------------------------
    def register(self, vm) -> None:
        """Register each region as a KVM memory slot (slot number = region index)."""
        for r in self.regions:
            vm.set_user_memory_region(r.slot, r.gpa, r.size, r.host_addr)

    # ---- lookup -------------------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest access gpa={gpa:#x} length={length}")
        for r in self.regions:
            off = gpa - r.gpa
            if 0 <= off < r.size:  # not r.end: a property call per region, per descriptor
                if length > r.size - off:
                    raise GuestMemoryError(
                        f"guest access [{gpa:#x}, {gpa + length:#x}) leaves RAM region "
                        f"[{r.gpa:#x}, {r.end:#x})")
                if r._view is None:
                    raise GuestMemoryError("guest memory is closed")
                return r, off
        raise GuestMemoryError(f"guest address {gpa:#x} (length {length}) is not in RAM")

    def host_address(self, gpa: int, length: int) -> int:
        """This process's address of [gpa, gpa + length), which must lie inside one region: what a
        vhost-user front-end puts into SET_VRING_ADDR (ring addresses are front-end user addresses)."""
        r, off = self._locate(gpa, length)
        return r.host_addr + off

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if [gpa, gpa+length) lies inside one RAM region."""
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    @property
    def shareable(self) -> bool:
        """True if every region has a file another process can map (vhost-user needs that)."""
        return all(r.shareable for r in self.regions)

    def ram_ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of every RAM region, for the e820 map."""
        return [(r.gpa, r.size) for r in self.regions]

    @property
    def low_ram_end(self) -> int:
        """End of the RAM region starting at 0 (where initrd and boot data must go)."""
        return self.regions[0].end

    # ---- access -------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; the range must lie inside one region."""
        # Fast path, without the _locate call: a virtqueue takes a view per descriptor, and the
        # worker runs cold (issue 9). Anything unusual falls through to the checked path below.
        if length > 0:
            for r in self.regions:
                off = gpa - r.gpa
                if 0 <= off and off + length <= r.size and r._view is not None:
                    return r._view[off:off + length]
        if length == 0 and gpa >= 0:
            return memoryview(b"")  # an empty range lies inside anything
        r, off = self._locate(gpa, length)
        return r._view[off:off + length]  # type: ignore[index]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        n = src.nbytes
        if n == 0:
            if gpa < 0:
                raise GuestMemoryError(f"invalid guest address {gpa:#x}")
            return
        r, off = self._locate(gpa, n)
        r._view[off:off + n] = src  # type: ignore[index]

    def _unpack(self, s: struct.Struct, gpa: int) -> int:
        r, off = self._locate(gpa, s.size)
        return s.unpack_from(r._view, off)[0]  # type: ignore[arg-type]

    def _pack(self, s: struct.Struct, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, s.size)
        try:
            s.pack_into(r._view, off, value)  # type: ignore[arg-type]
        except struct.error as e:
            raise GuestMemoryError(f"value {value!r} does not fit in {s.size} bytes") from e

    def read_u16(self, gpa: int) -> int:
        return self._unpack(_U16, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._unpack(_U32, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._unpack(_U64, gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self._pack(_U16, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._pack(_U32, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._pack(_U64, gpa, value)

    # ---- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Unmap all regions.  Views still held elsewhere keep their mapping alive (logged)."""
        for r in self.regions:
            r.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
