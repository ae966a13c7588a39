"""The passthrough's inode table: FUSE node ids <-> host inodes held open as O_PATH fds.

Why an fd per inode: every later operation (lookup below it, getattr, open, xattr, ...) is done
relative to that fd, never by path, so a host-side rename or a symlink swapped into the tree can
not redirect a request outside the shared directory. Holding the fd also pins the host inode, so
its (st_dev, st_ino) key cannot be reused by another file while the guest still knows the node.

Why pins: the guest may FORGET a node on the hiprio queue while a request queue is still using
its fd, so an fd is closed only when the lookup count is 0 *and* no request holds a pin
(``with table.pin(nodeid) as inode:``); pins.py holds that rule for this table and the handle table.

Why a limit: every node id costs the host one fd and a few hundred bytes until the guest forgets
it, and a guest decides how many it keeps. Past ``max_inodes`` a LOOKUP of a host inode the table
does not know yet fails with ENFILE; node ids already known (and a new lookup of one of them,
which :meth:`InodeTable.add_known` answers without opening anything) keep working.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from .pins import PinnedFds, close_fd

logger = logging.getLogger(__name__)

#: How this process names its own fds for a reopen: ``<_proc_root>self/fd/N`` (a magic link that
#: reaches exactly the inode fd N holds). A device jailed by devices/jail has no /proc after
#: pivot_root; the jail leaves its cwd on a private procfs and the device calls
#: ``set_proc_root(jail.proc_root)`` (that is, ""), so the same links are reached relative to it.
_proc_root = "/proc/"


def set_proc_root(prefix: str) -> None:
    """Where ``self/fd/N`` lives for this process: "/proc/" (default) or "" (cwd, in a jail)."""
    global _proc_root
    if prefix and not prefix.endswith("/"):
        raise ValueError(f"proc root must be empty or end with '/': {prefix!r}")
    _proc_root = prefix


def proc_fd_path(fd: int) -> str:
    """The magic link that reopens fd `fd` of this process (never re-resolves a name)."""
    return f"{_proc_root}self/fd/{fd}"


def proc_self_path(rel: str) -> str:
    """``/proc/self/<rel>`` of this process, also inside a jail (its schedstat, fdinfo)."""
    return f"{_proc_root}self/{rel}"


ROOT_ID = 1
#: libfuse (and crosvm) start the root with two references so that a stray FORGET of the root
#: cannot drop it; we additionally never close the root before destroy().
ROOT_INITIAL_LOOKUPS = 2


@dataclass(eq=False, slots=True)
class Inode:
    nodeid: int
    fd: int          # O_PATH | O_NOFOLLOW (| O_DIRECTORY for directories)
    dev: int
    ino: int
    ftype: int       # stat.S_IFMT(st_mode); fixed for the life of a host inode
    lookups: int
    pins: int = 0
    live: bool = True  # still in the table (lookups > 0 or root)

    @property
    def is_dir(self) -> bool:
        return self.ftype == stat.S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.ftype == stat.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.ftype == stat.S_IFLNK

    @property
    def proc_path(self) -> str:
        """Magic link that reopens exactly this inode (never re-resolves a name)."""
        return proc_fd_path(self.fd)


class InodeTable:
    """Thread-safe map nodeid -> Inode, plus (st_dev, st_ino) -> Inode so that repeated lookups
    and hard links of one host inode share one nodeid. Node ids are monotonic, never reused.

    At most ``max_inodes`` node ids (the root included) are known at once (module docstring)."""

    def __init__(self, max_inodes: int | None = None) -> None:
        self._pins = PinnedFds("inode table")
        self._lock = self._pins.lock
        self._by_id: dict[int, Inode] = {}
        self._by_key: dict[tuple[int, int], Inode] = {}
        self._next_id = ROOT_ID + 1
        self.max_inodes = max_inodes

    def _full(self) -> bool:
        return self.max_inodes is not None and len(self._by_id) >= self.max_inodes

    def check_room(self) -> None:
        """ENFILE if no new node id can be added: checked before a request creates a host entry,
        so that a full table refuses the creation instead of leaving an entry the guest never
        hears of."""
        with self._lock:
            if self._full():
                raise OSError(errno.ENFILE, f"{self.max_inodes} node ids known (max_inodes)")

    def add_known(self, st: os.stat_result) -> Inode | None:
        """Record one more lookup of the host inode ``st`` describes if the table knows it
        already (no fd is needed for that); None if it is unknown."""
        with self._lock:
            inode = self._by_key.get((st.st_dev, st.st_ino))
            if inode is not None:
                inode.lookups += 1
            return inode

    def ref(self, inode: Inode) -> None:
        """One more lookup of an inode the caller holds pinned (a hard link to it)."""
        with self._lock:
            if not inode.live:
                raise OSError(errno.ESTALE, f"nodeid {inode.nodeid} was forgotten")
            inode.lookups += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def set_root(self, fd: int, st: os.stat_result) -> None:
        """Install the share root as nodeid 1 (takes ownership of fd)."""
        with self._lock:
            if ROOT_ID in self._by_id:
                raise RuntimeError("root already installed")
            root = Inode(ROOT_ID, fd, st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode),
                         ROOT_INITIAL_LOOKUPS)
            self._by_id[ROOT_ID] = root
            self._by_key[(st.st_dev, st.st_ino)] = root

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """Record one lookup of the host inode `fd` refers to (takes ownership of fd).

        If the inode is already known its lookup count goes up and `fd` is closed; otherwise a
        new nodeid is allocated (ENFILE, and `fd` closed, when ``max_inodes`` are known)."""
        key = (st.st_dev, st.st_ino)
        dup = -1
        try:
            with self._lock:
                existing = self._by_key.get(key)
                if existing is not None:
                    existing.lookups += 1
                    dup = fd
                elif self._full():
                    raise OSError(errno.ENFILE, f"{self.max_inodes} node ids known (max_inodes)")
                else:
                    existing = Inode(self._next_id, fd, st.st_dev, st.st_ino,
                                     stat.S_IFMT(st.st_mode), 1)
                    self._next_id += 1
                    self._by_id[existing.nodeid] = existing
                    self._by_key[key] = existing
        except BaseException:  # the table never took the fd (a full table or a wedged lock)
            close_fd(fd)
            raise
        close_fd(dup)
        return existing

    @contextmanager
    def pin_dir(self, nodeid: int) -> Iterator[Inode]:
        """Like pin(), for a parent directory of a name: a non-directory -> ENOTDIR."""
        with self.pin(nodeid) as inode:
            if not inode.is_dir:
                raise OSError(errno.ENOTDIR, f"nodeid {nodeid} is not a directory")
            yield inode

    def pin(self, nodeid: int) -> AbstractContextManager[Inode]:
        """Borrow the inode for the duration of a request; unknown nodeid -> EBADF."""
        return self._pins.pin(self._find, nodeid)

    def _find(self, nodeid: int) -> Inode:
        inode = self._by_id.get(nodeid)
        if inode is None:
            raise OSError(errno.EBADF, f"unknown nodeid {nodeid}")
        return inode

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop `nlookup` references; at 0 the node disappears and its fd is closed (once no
        request holds it). Unknown node ids are ignored: FORGET has no reply to carry an error."""
        fd = -1
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None:
                logger.debug("forget of unknown nodeid %d ignored", nodeid)
                return
            inode.lookups = max(0, inode.lookups - max(0, nlookup))
            if inode.lookups == 0 and nodeid != ROOT_ID:
                del self._by_id[nodeid]
                if self._by_key.get((inode.dev, inode.ino)) is inode:
                    del self._by_key[(inode.dev, inode.ino)]
                fd = self._pins.retire(inode)
        close_fd(fd)

    def one_dir_per_device(self) -> list[int]:
        """Node ids of one known directory per host file system (st_dev), the root's first:
        what SYNCFS needs to reach every file system the guest has written to."""
        with self._lock:
            root = self._by_id.get(ROOT_ID)
            seen = {root.dev} if root is not None else set()
            ids = [ROOT_ID] if root is not None else []
            for inode in self._by_id.values():
                if inode.is_dir and inode.dev not in seen:
                    seen.add(inode.dev)
                    ids.append(inode.nodeid)
            return ids

    def lookup_count(self, nodeid: int) -> int:
        """Current lookup count (0 if unknown); for tests and metrics."""
        with self._lock:
            inode = self._by_id.get(nodeid)
            return inode.lookups if inode is not None else 0

    def clear(self) -> bool:
        """Forget everything (DESTROY / re-INIT). Pinned fds are closed when their pin ends.
        False if the table is wedged (see PinnedFds.clear)."""
        def take_all() -> list[Inode]:
            inodes = list(self._by_id.values())
            self._by_id.clear()
            self._by_key.clear()
            return inodes
        return self._pins.clear(take_all)
