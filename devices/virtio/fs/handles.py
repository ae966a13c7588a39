"""The passthrough's open-handle table: FUSE fh <-> host fd of an opened file or directory.

Handles are pinned while a request uses them for the same reason as inodes (see pins.py): a
RELEASE racing a READ on another queue must not close an fd that is still being read, or the fd
number could be reused by an unrelated open.

Why a limit: every handle costs the host one fd (and a directory handle up to one
``readdir_buffer`` while a listing is in progress) until the guest releases it. Past
``max_handles`` an OPEN, CREATE or OPENDIR fails with EMFILE, the errno a process gets at its own
open-file limit; every request on handles already open keeps working.
"""

from __future__ import annotations

import errno
from contextlib import AbstractContextManager
from dataclasses import dataclass

from .dirstream import DirStream
from .pins import PinnedFds, close_fd


@dataclass(eq=False, slots=True)
class Handle:
    fh: int
    nodeid: int
    fd: int
    is_dir: bool
    # Directory handles: where the listing stands (dirstream.py); None for files.
    stream: DirStream | None = None
    pins: int = 0
    live: bool = True


class HandleTable:
    """Thread-safe map fh -> Handle. Handle numbers are monotonic, starting at 1.

    At most ``max_handles`` are open at once (module docstring)."""

    def __init__(self, max_handles: int | None = None) -> None:
        self._pins = PinnedFds("handle table")
        self._by_fh: dict[int, Handle] = {}
        self._next_fh = 1
        self.max_handles = max_handles

    def __len__(self) -> int:
        with self._pins.lock:
            return len(self._by_fh)

    def _full(self) -> bool:
        return self.max_handles is not None and len(self._by_fh) >= self.max_handles

    def _full_error(self) -> OSError:
        return OSError(errno.EMFILE, f"{self.max_handles} handles open (max_handles)")

    def check_room(self) -> None:
        """EMFILE if no handle can be added: checked before a request opens or creates
        anything on the host, so a full table refuses the request with nothing done."""
        with self._pins.lock:
            if self._full():
                raise self._full_error()

    def add(self, nodeid: int, fd: int, is_dir: bool, stream: DirStream | None = None) -> int:
        """Take ownership of fd and return a new handle number (EMFILE, and fd closed, when
        ``max_handles`` are open)."""
        try:
            with self._pins.lock:
                if self._full():
                    raise self._full_error()
                fh = self._next_fh
                self._next_fh += 1
                self._by_fh[fh] = Handle(fh, nodeid, fd, is_dir, stream)
                return fh
        except BaseException:
            close_fd(fd)
            raise

    def dir_buffer_bytes(self) -> int:
        """Bytes of directory records all handles keep between READDIRs (for limits checks)."""
        with self._pins.lock:
            streams = [h.stream for h in self._by_fh.values() if h.stream is not None]
        return sum(s.pending_bytes for s in streams)

    def _find(self, fh: int, nodeid: int, is_dir: bool) -> Handle:
        h = self._by_fh.get(fh)
        if h is None or h.nodeid != nodeid:
            raise OSError(errno.EBADF, f"unknown handle {fh} for nodeid {nodeid}")
        if h.is_dir != is_dir:
            raise OSError(errno.EISDIR if h.is_dir else errno.ENOTDIR,
                          f"handle {fh} is a {'directory' if h.is_dir else 'file'} handle")
        return h

    def pin(self, fh: int, nodeid: int, is_dir: bool = False) -> AbstractContextManager[Handle]:
        """Borrow a handle; EBADF if unknown or opened for another node, EISDIR/ENOTDIR if it is
        of the other kind."""
        return self._pins.pin(self._find, fh, nodeid, is_dir)

    def remove(self, fh: int, nodeid: int, is_dir: bool = False) -> None:
        """Release a handle; its fd is closed now or when the last in-flight request ends."""
        with self._pins.lock:
            h = self._find(fh, nodeid, is_dir)
            del self._by_fh[fh]
            fd = self._pins.retire(h)
        close_fd(fd)

    def clear(self) -> bool:
        """Release every handle; False if the table is wedged (see PinnedFds.clear)."""
        def take_all() -> list[Handle]:
            handles = list(self._by_fh.values())
            self._by_fh.clear()
            return handles
        return self._pins.clear(take_all)
