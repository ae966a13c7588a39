"""Guest memory as a vhost-user backend sees it: regions mmap'd from the front-end's descriptors.

SET_MEM_TABLE hands us up to eight regions, each `(guest address, size, user address, mmap
offset)` plus a file descriptor (a memfd or a hugetlbfs file behind the front-end's guest RAM). We map
each one MAP_SHARED, so the guest's writes to its rings and buffers are visible here and our
replies are visible to the guest, without any copy through the front-end.

Two address spaces meet here:

- *guest-physical* addresses: what descriptors in the rings carry. `view`/`read`/`write` and the
  `read_u*`/`write_u*` helpers take these, with the same interface and the same rule as
  `vmm.memory.GuestMemory` (an access must lie inside ONE region, errors are `ValueError`s), so the
  split-ring code (`devices/virtio/queue.py`, `chain.py`) runs on this object unchanged.
- front-end *user* addresses: SET_VRING_ADDR gives the ring addresses in the front-end's own
  virtual address space (no IOMMU here). `translate_user` turns them into guest-physical
  addresses, so the transport hands `Queue` guest-physical addresses like virtio-mmio does.

Everything comes from a peer we do not trust: the table is checked for empty, overflowing and
overlapping regions (in both address spaces), every descriptor must be a regular file long enough
for the region (mapping past the end of a file would turn a later access into SIGBUS), and every
access is bounds-checked. One hazard remains outside our control: a front-end that *shrinks* the
file after we mapped it makes our next access fault. QEMU seals its memfd against that by default
(memory-backend-memfd `seal=on`); we log once when a region's file is not sealed.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Sequence

from .protocol import MemoryRegion

logger = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
U64_LIMIT = 1 << 64
OFF_T_LIMIT = 1 << 63

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


class VhostUserMemoryError(ValueError):
    """A bad memory table or an out-of-range access (a ValueError, like GuestMemoryError)."""


@dataclass
class MappedRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    mmap: mmap.mmap | None = field(default=None, repr=False)
    view: memoryview | None = field(default=None, repr=False)  # exactly the region's bytes

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    @property
    def user_end(self) -> int:
        return self.user_addr + self.size


def validate_table(table: Sequence[MemoryRegion]) -> None:
    """Reject a table with an empty, overflowing or overlapping region (no fds needed)."""
    for i, r in enumerate(table):
        if r.size <= 0:
            raise VhostUserMemoryError(f"region {i} is empty")
        if r.guest_addr + r.size > U64_LIMIT:
            raise VhostUserMemoryError(f"region {i}: guest range {r.guest_addr:#x}+{r.size:#x} overflows")
        if r.user_addr + r.size > U64_LIMIT:
            raise VhostUserMemoryError(f"region {i}: user range {r.user_addr:#x}+{r.size:#x} overflows")
        if r.mmap_offset + r.size > OFF_T_LIMIT:
            raise VhostUserMemoryError(f"region {i}: mmap offset {r.mmap_offset:#x}+{r.size:#x} overflows")
    for key, what in ((lambda r: r.guest_addr, "guest"), (lambda r: r.user_addr, "user")):
        spans = sorted((key(r), key(r) + r.size, i) for i, r in enumerate(table))
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise VhostUserMemoryError(f"regions {a} and {b} overlap in {what} address space")


def _check_fd(i: int, region: MemoryRegion, fd: int) -> bool:
    """The fd must be a regular file covering the region; returns whether it is shrink-sealed."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise VhostUserMemoryError(f"region {i}: bad file descriptor: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise VhostUserMemoryError(f"region {i}: descriptor is not a regular file (mode {st.st_mode:#o})")
    if st.st_size < region.mmap_offset + region.size:
        raise VhostUserMemoryError(f"region {i}: file of {st.st_size:#x} bytes is shorter than offset "
                                   f"{region.mmap_offset:#x} + size {region.size:#x}")
    try:
        return bool(fcntl.fcntl(fd, _F_GET_SEALS) & _F_SEAL_SHRINK)
    except OSError:
        return False  # not a memfd (hugetlbfs or tmpfs file): cannot be sealed


class VhostUserMemory:
    """Guest RAM regions mapped from a SET_MEM_TABLE; the GuestMemory interface on top."""

    def __init__(self, regions: list[MappedRegion]) -> None:
        self.regions = sorted(regions, key=lambda r: r.guest_addr)
        self.size = sum(r.size for r in self.regions)
        self._closed = False

    @classmethod
    def from_table(cls, table: Sequence[MemoryRegion], fds: Sequence[int]) -> VhostUserMemory:
        """Validate and map `table`; `fds[i]` backs region i. The fds stay the caller's (the
        mappings keep the files alive, so the caller closes them right after)."""
        if len(fds) != len(table):
            raise VhostUserMemoryError(f"{len(table)} regions but {len(fds)} file descriptors")
        validate_table(table)
        mapped: list[MappedRegion] = []
        unsealed = 0
        try:
            for i, (r, fd) in enumerate(zip(table, fds)):
                if not _check_fd(i, r, fd):
                    unsealed += 1
                start = r.mmap_offset - r.mmap_offset % PAGE_SIZE
                delta = r.mmap_offset - start
                try:
                    mm = mmap.mmap(fd, delta + r.size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
                except (OSError, ValueError, OverflowError) as e:
                    raise VhostUserMemoryError(f"region {i}: mmap failed: {e}") from None
                mapped.append(MappedRegion(r.guest_addr, r.size, r.user_addr, r.mmap_offset, mm,
                                           memoryview(mm)[delta:delta + r.size]))
        except BaseException:
            cls(mapped).close()
            raise
        if unsealed:
            logger.info("vhost-user memory: %d of %d region files are not sealed against shrinking; "
                        "a front-end that truncates them would crash this backend", unsealed, len(table))
        logger.debug("vhost-user memory: %s", ", ".join(
            f"gpa [{r.guest_addr:#x}, {r.end:#x}) at user {r.user_addr:#x}" for r in mapped))
        return cls(mapped)

    # ---- translation ----------------------------------------------------------------------------
    def translate_user(self, user_addr: int, length: int) -> int:
        """The guest-physical address of front-end user address `user_addr`; the whole range
        [user_addr, user_addr + length) must lie in one region."""
        if user_addr < 0 or length < 0:
            raise VhostUserMemoryError(f"invalid user range {user_addr:#x}+{length}")
        for r in self.regions:
            if r.user_addr <= user_addr < r.user_end:
                if length > r.user_end - user_addr:
                    raise VhostUserMemoryError(f"user range [{user_addr:#x}, {user_addr + length:#x}) "
                                               f"leaves region [{r.user_addr:#x}, {r.user_end:#x})")
                return r.guest_addr + (user_addr - r.user_addr)
        raise VhostUserMemoryError(f"user address {user_addr:#x} (length {length}) is in no region")

    # ---- the GuestMemory interface -------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[MappedRegion, int]:
        if gpa < 0 or length < 0:
            raise VhostUserMemoryError(f"invalid guest access gpa={gpa:#x} length={length}")
        for r in self.regions:
            if r.guest_addr <= gpa < r.end:
                off = gpa - r.guest_addr
                if length > r.size - off:
                    raise VhostUserMemoryError(f"guest access [{gpa:#x}, {gpa + length:#x}) leaves "
                                               f"region [{r.guest_addr:#x}, {r.end:#x})")
                if r.view is None:
                    raise VhostUserMemoryError("guest memory is closed")
                return r, off
        raise VhostUserMemoryError(f"guest address {gpa:#x} (length {length}) is in no region")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._locate(gpa, length)
        except VhostUserMemoryError:
            return False
        return True

    def ram_ranges(self) -> list[tuple[int, int]]:
        return [(r.guest_addr, r.size) for r in self.regions]

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; the range must lie inside one region."""
        if length == 0 and gpa >= 0:
            return memoryview(b"")
        r, off = self._locate(gpa, length)
        return r.view[off:off + length]  # type: ignore[index]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        if src.nbytes == 0:
            if gpa < 0:
                raise VhostUserMemoryError(f"invalid guest address {gpa:#x}")
            return
        r, off = self._locate(gpa, src.nbytes)
        r.view[off:off + src.nbytes] = src  # type: ignore[index]

    def _unpack(self, s: struct.Struct, gpa: int) -> int:
        r, off = self._locate(gpa, s.size)
        return s.unpack_from(r.view, off)[0]  # type: ignore[arg-type]

    def _pack(self, s: struct.Struct, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, s.size)
        try:
            s.pack_into(r.view, off, value)  # type: ignore[arg-type]
        except struct.error as e:
            raise VhostUserMemoryError(f"value {value!r} does not fit in {s.size} bytes") from e

    def read_u8(self, gpa: int) -> int:
        r, off = self._locate(gpa, 1)
        return r.view[off]  # type: ignore[index]

    def write_u8(self, gpa: int, value: int) -> None:
        if not 0 <= value <= 0xFF:
            raise VhostUserMemoryError(f"value {value!r} does not fit in 1 byte")
        r, off = self._locate(gpa, 1)
        r.view[off] = value  # type: ignore[index]

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

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every region. A view still held elsewhere (a chain the worker dropped late) keeps
        its mapping alive until it is released; the mapping is then freed with the mmap object."""
        for r in self.regions:
            if r.view is not None:
                r.view.release()
                r.view = None
            if r.mmap is not None:
                try:
                    r.mmap.close()
                except BufferError:
                    logger.debug("vhost-user memory: region at %#x still has live views", r.guest_addr)
                r.mmap = None
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> VhostUserMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
