"""Guest memory as a vhost-user back-end sees it: regions mmap'd from the front-end's descriptors.

SET_MEM_TABLE hands us up to eight regions, each `(guest address, size, user address, mmap
offset)` plus a file descriptor (a memfd or a hugetlbfs file behind the front-end's guest RAM). We map
each one MAP_SHARED, so the guest's writes to its rings and buffers are visible here and our
replies are visible to the guest, without any copy through the front-end.

The result is an ordinary `devices.memory.GuestMemory` of `MemoryRegion`s (so the bounds checks, the
one-region rule and the accessors are the very code virtio-mmio devices run on, and the split-ring
code in `devices/virtio/queue.py` and `chain.py` sees no difference) plus the one thing only
vhost-user needs: the front-end's *user* addresses. SET_VRING_ADDR gives the ring addresses in the
front-end's own virtual address space (no IOMMU here); `translate_user` turns them into
guest-physical addresses, so the transport hands `Queue` guest-physical addresses like virtio-mmio.

Everything comes from a peer we do not trust: the table is checked for empty, overflowing and
overlapping regions (in both address spaces), every descriptor must be a regular file long enough
for the region (mapping past the end of a file would turn a later access into SIGBUS), and every
access is bounds-checked by GuestMemory. One hazard remains outside our control: a front-end that
*shrinks* the file after we mapped it makes our next access fault. QEMU (and our own front-end)
seal the memfd against that; we log once when a region's file is not sealed.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Sequence

from devices.memory import GuestMemory, GuestMemoryError, MemoryRegion

from .protocol import MemoryRegion as TableRegion

logger = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
U64_LIMIT = 1 << 64
OFF_T_LIMIT = 1 << 63

_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


def validate_table(table: Sequence[TableRegion]) -> None:
    """Reject a table with an empty, overflowing or overlapping region (no fds needed)."""
    for i, r in enumerate(table):
        if r.size <= 0:
            raise GuestMemoryError(f"region {i} is empty")
        if r.guest_addr + r.size > U64_LIMIT:
            raise GuestMemoryError(f"region {i}: guest range {r.guest_addr:#x}+{r.size:#x} overflows")
        if r.user_addr + r.size > U64_LIMIT:
            raise GuestMemoryError(f"region {i}: user range {r.user_addr:#x}+{r.size:#x} overflows")
        if r.mmap_offset + r.size > OFF_T_LIMIT:
            raise GuestMemoryError(f"region {i}: mmap offset {r.mmap_offset:#x}+{r.size:#x} overflows")
    for key, what in ((lambda r: r.guest_addr, "guest"), (lambda r: r.user_addr, "user")):
        spans = sorted((key(r), key(r) + r.size, i) for i, r in enumerate(table))
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise GuestMemoryError(f"regions {a} and {b} overlap in {what} address space")


def _check_fd(i: int, region: TableRegion, fd: int) -> bool:
    """The fd must be a regular file covering the region; returns whether it is shrink-sealed."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise GuestMemoryError(f"region {i}: bad file descriptor: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise GuestMemoryError(f"region {i}: descriptor is not a regular file (mode {st.st_mode:#o})")
    if st.st_size < region.mmap_offset + region.size:
        raise GuestMemoryError(f"region {i}: file of {st.st_size:#x} bytes is shorter than offset "
                               f"{region.mmap_offset:#x} + size {region.size:#x}")
    try:
        return bool(fcntl.fcntl(fd, _F_GET_SEALS) & _F_SEAL_SHRINK)
    except OSError:
        return False  # not a memfd (hugetlbfs or tmpfs file): cannot be sealed


class VhostUserMemory(GuestMemory):
    """Guest RAM regions mapped from a SET_MEM_TABLE, plus the front-end's user addresses."""

    def __init__(self, regions: Sequence[tuple[MemoryRegion, int]]) -> None:
        """`regions`: each mapped region with the front-end user address it starts at."""
        # (user start, user end, guest address), sorted: the table translate_user searches
        self._user = sorted((user, user + r.size, r.gpa) for r, user in regions)
        super().__init__(r for r, _ in regions)

    @classmethod
    def from_table(cls, table: Sequence[TableRegion], fds: Sequence[int]) -> VhostUserMemory:
        """Validate and map `table`; `fds[i]` backs region i. The fds stay the caller's (the
        mappings keep the files alive, so the caller closes them right after)."""
        if len(fds) != len(table):
            raise GuestMemoryError(f"{len(table)} regions but {len(fds)} file descriptors")
        validate_table(table)
        mapped: list[tuple[MemoryRegion, int]] = []
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
                    raise GuestMemoryError(f"region {i}: mmap failed: {e}") from None
                try:
                    mapped.append((MemoryRegion(r.guest_addr, mm, offset=delta, size=r.size),
                                   r.user_addr))
                except BaseException:
                    mm.close()
                    raise
        except BaseException:
            for region, _ in mapped:
                region.close()
            raise
        if unsealed:
            logger.info("vhost-user memory: %d of %d region files are not sealed against shrinking; "
                        "a front-end that truncates them would crash this backend", unsealed, len(table))
        logger.debug("vhost-user memory: %s", ", ".join(
            f"gpa [{r.gpa:#x}, {r.end:#x}) at user {user:#x}" for r, user in mapped))
        return cls(mapped)

    def translate_user(self, user_addr: int, length: int) -> int:
        """The guest-physical address of front-end user address `user_addr`; the whole range
        [user_addr, user_addr + length) must lie in one region."""
        if user_addr < 0 or length < 0:
            raise GuestMemoryError(f"invalid user range {user_addr:#x}+{length}")
        for start, end, gpa in self._user:
            if start <= user_addr < end:
                if length > end - user_addr:
                    raise GuestMemoryError(f"user range [{user_addr:#x}, {user_addr + length:#x}) "
                                           f"leaves region [{start:#x}, {end:#x})")
                return gpa + (user_addr - start)
        raise GuestMemoryError(f"user address {user_addr:#x} (length {length}) is in no region")
