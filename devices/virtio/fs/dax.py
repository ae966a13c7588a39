"""The DAX window of a virtio-fs device: file ranges mapped straight into guest-physical memory.

virtio-fs DAX (virtio 1.2 sec. 5.11.6) gives the device a shared memory region (id 0, "cache")
that the guest sees as memory above its RAM. Instead of READ/WRITE requests that copy data through
the virtqueue, the guest sends FUSE_SETUPMAPPING (map this file range at this window offset) and
then loads and stores to the window; FUSE_REMOVEMAPPING gives a range back. The host side is one
reserved mapping of the whole window (anonymous, PROT_NONE, MAP_NORESERVE: it costs address space
only) registered as its own KVM memory slot; a SETUPMAPPING replaces part of it with
``mmap(MAP_FIXED | MAP_SHARED)`` of the file, a REMOVEMAPPING puts the reserved mapping back. KVM
follows the host page tables (MMU notifiers), so the guest sees each change at its next access.

Everything the guest sends is checked against the window here: offsets and lengths aligned to
``alignment`` (announced as ``map_alignment``), inside the window, no overflow. Bookkeeping is a
sorted list of disjoint intervals; a new mapping replaces whatever overlapped it (as mmap does).

Lifetimes: a mapping made through an open handle dies with that handle (RELEASE); Linux 6.1 maps
by inode (fh = u64 max) and such mappings live until REMOVEMAPPING; every mapping dies at the end
of the session (DESTROY, a new INIT, a device reset).

A file truncated on the host under a live mapping: KVM cannot get a page past the new end of
file, and nothing reaches this process as SIGBUS (only KVM ever touches the window). What the vCPU
sees depends on how the access ran: one KVM executes directly fails KVM_RUN with EFAULT (the VMM's
vCPU loop calls ``repair_truncated`` and enters again); one KVM's instruction emulator performs
(every guest kernel access on kvm_pvm) cannot read the page either and turns into an MMIO exit at
the window's guest-physical address, which ``WindowFaults`` -- the window on the MMIO bus -- gets.
``repair_truncated`` replaces every mapped page past its file's end with anonymous zero pages, so
the guest reads zeros there (as from a hole) instead of the machine stopping; an emulated access
that exits reads zeros and its writes are dropped, logged. The window keeps one fd per mapped file
for that ``fstat``.

``PassthroughFs`` calls ``setupmapping``/``removemapping``/``drop_owner``/``reset`` through small
hooks; the device makes the window, the VMM registers ``host_addr``/``size`` as a memory slot.

*What* is mapped *where* (the intervals, their owners, the per-file references) is this class's
bookkeeping; *how* a range is mapped is a ``DaxMapper`` strategy. ``LocalMapper`` (the default)
owns the reserved host mapping and mmaps into it: the in-process device (``sandbox: none``) and
the VMM's side of a sandboxed device. A jailed back-end child cannot map into the VMM's address
space, so its window uses the vhost-user back-end request channel instead
(``devices/virtio/vhost_user/backend_req.py``: VHOST_USER_SLAVE_FS_MAP/FS_UNMAP, the file's fd in
SCM_RIGHTS), and the VMM applies each request to its own ``LocalMapper`` window after checking it
again. Both windows run this same bookkeeping, so a handle's RELEASE or the end of the session
unmaps the same ranges on both sides.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from typing import Protocol

from fuse import abi
from fuse.limits import OFFSET_MAX, RequestError
from fuse.logthrottle import LogThrottle

__all__ = ["DaxMapper", "DaxWindow", "HasDaxWindow", "LocalMapper", "MAP_ALIGNMENT_SHIFT",
           "INODE_FH"]

logger = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: log2 of the alignment SETUPMAPPING offsets and lengths need: one host page. (Linux guests map
#: 2 MiB chunks, FUSE_DAX_SHIFT, and refuse an alignment above that.)
MAP_ALIGNMENT_SHIFT = PAGE_SIZE.bit_length() - 1
#: fuse_setupmapping_in.fh when the guest maps by inode rather than through an open handle.
INODE_FH = (1 << 64) - 1

_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _sys_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int = -1,
              offset: int = 0) -> int:
    got = _mmap(addr, length, prot, flags, fd, offset)
    if got is None or got == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return got


class DaxMapper(Protocol):
    """How a window's ranges are really mapped (see the module docstring).

    ``map`` and ``unmap`` raise OSError when the range could not be changed (nothing changed
    then); the window checked every offset and length before calling them.
    """

    #: The window keeps a duplicate fd per mapped file: needed to find pages past a truncated
    #: file's end (``repair_truncated``), which only the side owning the host mapping does.
    keeps_files: bool
    #: Host address of the window (0 when this process does not own the mapping).
    host_addr: int

    def map(self, moffset: int, length: int, fd: int, foffset: int, writable: bool) -> None: ...

    def unmap(self, moffset: int, length: int) -> None: ...

    def zero_fill(self, moffset: int, length: int, writable: bool) -> None: ...

    def close(self) -> None: ...


class LocalMapper:
    """The window as reserved address space of this process, files mmap'ed into it."""

    keeps_files = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.host_addr = _sys_mmap(None, size, _PROT_NONE, self._reserve_flags())
        self._closed = False

    @staticmethod
    def _reserve_flags() -> int:
        return _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE

    def map(self, moffset: int, length: int, fd: int, foffset: int, writable: bool) -> None:
        # MAP_FIXED failing (EACCES, ENODEV...) fails before it replaces anything.
        prot = _PROT_READ | (_PROT_WRITE if writable else 0)
        _sys_mmap(self.host_addr + moffset, length, prot, _MAP_SHARED | _MAP_FIXED, fd, foffset)

    def unmap(self, moffset: int, length: int) -> None:
        _sys_mmap(self.host_addr + moffset, length, _PROT_NONE, self._reserve_flags() | _MAP_FIXED)

    def zero_fill(self, moffset: int, length: int, writable: bool) -> None:
        prot = _PROT_READ | (_PROT_WRITE if writable else 0)
        _sys_mmap(self.host_addr + moffset, length, prot, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if _munmap(self.host_addr, self.size) != 0:
            logger.warning("DAX window: munmap failed: %s", os.strerror(ctypes.get_errno()))


@dataclass
class _Mapping:
    """[start, end) of the window shows the file ``key`` from ``foffset`` on."""

    start: int
    end: int
    key: tuple[int, int]         # (st_dev, st_ino): which entry of DaxWindow._files
    foffset: int
    writable: bool
    owner: int | None            # the fh it was made through, None when made by inode


class DaxWindow:
    """``size`` bytes of window and the file ranges mapped into it.

    ``mapper``: how ranges are mapped (default: a ``LocalMapper`` of this process's own reserved
    address space). ``max_files``: at most this many distinct files mapped at once (ENFILE
    beyond; the VMM's side of a sandboxed device bounds the fds a child can make it hold).
    """

    def __init__(self, size: int, alignment: int = PAGE_SIZE, *,
                 mapper: DaxMapper | None = None, max_files: int | None = None) -> None:
        if alignment < PAGE_SIZE or alignment & (alignment - 1):
            raise ValueError(f"alignment {alignment} is not a power of two >= {PAGE_SIZE}")
        if size <= 0 or size % alignment:
            raise ValueError(f"DAX window size {size} is not a positive multiple of {alignment}")
        self.size = size
        self.alignment = alignment
        self.mapper: DaxMapper = mapper if mapper is not None else LocalMapper(size)
        self.host_addr = self.mapper.host_addr
        self.max_files = max_files
        self._lock = threading.Lock()
        self._maps: list[_Mapping] = []          # disjoint, sorted by start
        self._starts: list[int] = []             # the starts of _maps, for bisect
        self._files: dict[tuple[int, int], list[int]] = {}   # key -> [fd, mappings using it]
        self._repaired: set[int] = set()         # window offsets already given zero pages
        self._log = LogThrottle(logger)
        self.setups = 0
        self.removes = 0
        self.repairs = 0
        self._closed = False

    # ---- checks ---------------------------------------------------------------------------
    def check_range(self, moffset: int, length: int, what: str) -> None:
        """EINVAL unless [moffset, moffset + length) is a non-empty aligned part of the window."""
        a = self.alignment
        if length <= 0 or moffset < 0 or moffset % a or length % a or moffset + length > self.size:
            raise RequestError(errno.EINVAL, f"{what}: {length} bytes at window offset {moffset}"
                                             f" (window {self.size} bytes, alignment {a})")

    # ---- guest requests -------------------------------------------------------------------
    def map(self, moffset: int, fd: int, foffset: int, length: int, writable: bool,
            owner: int | None = None) -> None:
        """Map ``length`` bytes of ``fd`` from ``foffset`` at window offset ``moffset``.

        ``fd`` stays the caller's; the window keeps a duplicate per mapped file (see module doc).
        """
        self.check_range(moffset, length, "SETUPMAPPING")
        if foffset < 0 or foffset % PAGE_SIZE or foffset + length > OFFSET_MAX + 1:
            raise RequestError(errno.EINVAL, f"SETUPMAPPING file offset {foffset}")
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            self._check_open()
            self._hold_file(key, fd)
            try:
                self.mapper.map(moffset, length, fd, foffset, writable)
            except OSError as e:
                # The mapper changed nothing (MAP_FIXED fails before replacing anything).
                self._release_file(key)
                raise OSError(e.errno, f"SETUPMAPPING: {e.strerror}") from None
            self._cut(moffset, moffset + length)
            self._insert(_Mapping(moffset, moffset + length, key, foffset, writable, owner))
            self.setups += 1

    def unmap(self, moffset: int, length: int) -> None:
        """Put the reserved mapping back over [moffset, moffset + length) (mapped or not)."""
        self.check_range(moffset, length, "REMOVEMAPPING")
        with self._lock:
            self._check_open()
            self._reserve(moffset, length)
            self._cut(moffset, moffset + length)
            self.removes += 1

    def drop_owner(self, owner: int) -> int:
        """The handle ``owner`` was released: unmap what was mapped through it; returns the count."""
        with self._lock:
            if self._closed:
                return 0
            doomed = [m for m in self._maps if m.owner == owner]
            for m in doomed:
                try:
                    self._reserve(m.start, m.end - m.start)
                except OSError as e:    # a back-end channel that broke: the VMM resets anyway
                    self._log.warn("DAX window: unmapping a released handle's range: %s", e)
                self._cut(m.start, m.end)
            return len(doomed)

    def reset(self) -> None:
        """The session ended: the whole window goes back to reserved, every file fd is closed."""
        with self._lock:
            if self._closed:
                return
            if self._maps:
                try:
                    self._reserve(0, self.size)
                except OSError as e:    # a back-end channel that broke: the VMM resets anyway
                    self._log.warn("DAX window: unmapping everything at the session's end: %s", e)
            self._maps.clear()
            self._starts.clear()
            for fd, _count in self._files.values():
                if fd >= 0:
                    os.close(fd)
            self._files.clear()

    def repair_truncated(self) -> int:
        """Replace mapped pages past their file's end by zero pages; returns how many ranges.

        Called when a vCPU's KVM_RUN failed with EFAULT (see the module docstring). 0 means the
        window was not the cause, and the caller must treat the fault as fatal.
        """
        repaired = 0
        with self._lock:
            if self._closed or not self.mapper.keeps_files:
                return 0
            for m in self._maps:
                fd = self._files[m.key][0]
                try:
                    eof = os.fstat(fd).st_size
                except OSError:
                    eof = 0
                first_bad = max(eof - m.foffset, 0)
                first_bad = -(-first_bad // PAGE_SIZE) * PAGE_SIZE      # page past EOF
                start = m.start + first_bad
                if start >= m.end or start in self._repaired:
                    continue
                self.mapper.zero_fill(start, m.end - start, m.writable)
                self._repaired.add(start)
                repaired += 1
            self.repairs += repaired
        if repaired:
            self._log.warn("DAX window: %d mapping(s) reach past a file truncated on the host;"
                           " the guest reads zeros there", repaired)
        return repaired

    # ---- introspection (tests, metrics) ---------------------------------------------------
    def mappings(self) -> list[tuple[int, int, int, bool, int | None]]:
        """(moffset, length, foffset, writable, owner) of every live mapping, by offset."""
        with self._lock:
            return [(m.start, m.end - m.start, m.foffset, m.writable, m.owner) for m in self._maps]

    @property
    def open_files(self) -> int:
        return len(self._files)

    def metrics(self) -> dict:
        with self._lock:
            return {"window_bytes": self.size, "mapped_bytes": sum(m.end - m.start for m in self._maps),
                    "mappings": len(self._maps), "setups": self.setups, "removes": self.removes,
                    "truncation_repairs": self.repairs}

    # ---- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the window (after its KVM slot is gone). Idempotent."""
        self.reset()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.mapper.close()

    # ---- internals (with _lock held) ------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RequestError(errno.ENODEV, "DAX window closed")

    def _reserve(self, moffset: int, length: int) -> None:
        self.mapper.unmap(moffset, length)
        self._repaired = {r for r in self._repaired if not moffset <= r < moffset + length}

    def _hold_file(self, key: tuple[int, int], fd: int) -> None:
        entry = self._files.get(key)
        if entry is None:
            if self.max_files is not None and len(self._files) >= self.max_files:
                raise RequestError(errno.ENFILE, f"SETUPMAPPING: {self.max_files} files are "
                                                 "mapped already")
            self._files[key] = [os.dup(fd) if self.mapper.keeps_files else -1, 1]
        else:
            entry[1] += 1

    def _release_file(self, key: tuple[int, int]) -> None:
        entry = self._files[key]
        entry[1] -= 1
        if entry[1] == 0:
            if entry[0] >= 0:
                os.close(entry[0])
            del self._files[key]

    def _insert(self, m: _Mapping) -> None:
        i = bisect.bisect_left(self._starts, m.start)
        self._maps.insert(i, m)
        self._starts.insert(i, m.start)

    def _cut(self, start: int, end: int) -> None:
        """Drop [start, end) from the bookkeeping, trimming or splitting what overlaps it."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        keep: list[_Mapping] = []
        j = i
        while j < len(self._maps) and self._maps[j].start < end:
            m = self._maps[j]
            if m.end <= start:
                keep.append(m)
                j += 1
                continue
            if m.start < start:     # the piece before the cut
                keep.append(_Mapping(m.start, start, m.key, m.foffset, m.writable, m.owner))
                self._files[m.key][1] += 1
            if m.end > end:         # the piece after it
                keep.append(_Mapping(end, m.end, m.key, m.foffset + (end - m.start), m.writable,
                                     m.owner))
                self._files[m.key][1] += 1
            self._release_file(m.key)
            j += 1
        self._maps[i:j] = keep
        self._starts[i:j] = [m.start for m in keep]


# ---- the passthrough's side ---------------------------------------------------------------------

class HasDaxWindow:
    """A device model that may keep a DAX window the VMM maps as a memory slot: the in-process
    ``FsDevice``, or the front-end of a sandboxed back-end (which maps through the back-end
    request channel). The VMM places the window and the device reports it to the driver."""

    dax_window: DaxWindow | None = None
    shm_regions: dict[int, tuple[int, int]]

    def place_dax_window(self, gpa: int) -> None:
        """The VMM put the window at guest-physical ``gpa``: report it as shared memory region 0."""
        assert self.dax_window is not None
        self.shm_regions = {0: (gpa, self.dax_window.size)}


def setupmapping(window: DaxWindow, fs, nodeid: int, fh: int, foffset: int, length: int,
                 flags: int, moffset: int) -> None:
    """FUSE_SETUPMAPPING for ``PassthroughFs`` ``fs``: find or open the file, map it.

    By inode (``fh == INODE_FH``, what Linux sends) the regular file is opened read-only or
    read-write as the mapping needs; the guest only maps files it has open. Through a handle,
    a writable mapping needs a handle opened for writing (EACCES otherwise).
    """
    writable = bool(flags & abi.FUSE_SETUPMAPPING_FLAG_WRITE)
    window.check_range(moffset, length, "SETUPMAPPING")
    if fh == INODE_FH:
        with fs._inodes.pin(nodeid) as inode:
            if not inode.is_reg:
                raise RequestError(errno.EINVAL, "SETUPMAPPING of a node that is not a regular file")
            fd = os.open(inode.proc_path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        owner = None
    else:
        with fs._handles.pin(fh, nodeid) as h:
            fd = os.dup(h.fd)
        owner = fh
    try:
        if owner is not None and writable:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                raise RequestError(errno.EACCES, "writable SETUPMAPPING through a read-only handle")
        window.map(moffset, fd, foffset, length, writable, owner)
    finally:
        os.close(fd)


def removemapping(window: DaxWindow, ranges: list[tuple[int, int]]) -> None:
    """FUSE_REMOVEMAPPING: every range is checked before any is unmapped (all or nothing)."""
    for moffset, length in ranges:
        window.check_range(moffset, length, "REMOVEMAPPING")
    for moffset, length in ranges:
        window.unmap(moffset, length)


class WindowFaults:
    """The window's guest-physical range on the VMM's MMIO bus.

    A vCPU access reaches it only when KVM could not use the host page behind the window (see the
    module docstring): a page past the end of a truncated file, or a part of the window with no
    mapping. It repairs truncated mappings (later accesses then reach the zero pages without an
    exit), reads as zeros and drops writes; never touches the host mapping itself, which could
    fault in this process.
    """

    def __init__(self, window: DaxWindow, name: str) -> None:
        self.window = window
        self.name = name
        self._log = LogThrottle(logger)
        self.faults = 0

    def _fault(self, offset: int, size: int, what: str) -> None:
        self.faults += 1
        repaired = self.window.repair_truncated()
        self._log.warn("DAX window %s: guest %s of %d bytes at window offset %#x that KVM could not"
                       " map (%s)", self.name, what, size, offset,
                       "a truncated file: zero pages now" if repaired else "no valid mapping")

    def read(self, offset: int, size: int) -> bytes:
        self._fault(offset, size, "read")
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self._fault(offset, len(data), "write (dropped)")
