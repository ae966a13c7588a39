"""The passthrough's open-handle table: FUSE fh <-> host fd of an opened file or directory.

Handles are pinned while a request uses them for the same reason as inodes (see pins.py): a
RELEASE racing a READ on another queue must not close an fd that is still being read, or the fd
number could be reused by an unrelated open.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from typing import ContextManager

from .pins import PinnedFds, close_fd


@dataclass(eq=False)
class Handle:
    fh: int
    nodeid: int
    fd: int
    is_dir: bool
    # Directory handles: a snapshot of (d_ino, d_type, name) taken at offset 0, so READDIR
    # offsets (index + 1) stay stable while the guest resumes across several requests.
    entries: list[tuple[int, int, bytes]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    pins: int = 0
    live: bool = True


class HandleTable:
    """Thread-safe map fh -> Handle. Handle numbers are monotonic, starting at 1."""

    def __init__(self) -> None:
        self._pins = PinnedFds("handle table")
        self._by_fh: dict[int, Handle] = {}
        self._next_fh = 1

    def __len__(self) -> int:
        with self._pins.lock:
            return len(self._by_fh)

    def add(self, nodeid: int, fd: int, is_dir: bool) -> int:
        """Take ownership of fd and return a new handle number."""
        try:
            with self._pins.lock:
                fh = self._next_fh
                self._next_fh += 1
                self._by_fh[fh] = Handle(fh, nodeid, fd, is_dir)
                return fh
        except BaseException:
            close_fd(fd)
            raise

    def _find(self, fh: int, nodeid: int, is_dir: bool) -> Handle:
        h = self._by_fh.get(fh)
        if h is None or h.nodeid != nodeid:
            raise OSError(errno.EBADF, f"unknown handle {fh} for nodeid {nodeid}")
        if h.is_dir != is_dir:
            raise OSError(errno.EISDIR if h.is_dir else errno.ENOTDIR,
                          f"handle {fh} is a {'directory' if h.is_dir else 'file'} handle")
        return h

    def pin(self, fh: int, nodeid: int, is_dir: bool = False) -> ContextManager[Handle]:
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
            return handles  # type: ignore[return-value]
        return self._pins.clear(take_all)
