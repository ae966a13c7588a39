"""The interface a filesystem implements to be served by :class:`fuse.server.Server`.

The server does all wire decoding and validation; a filesystem sees plain Python values.
Errors are raised as ``OSError`` with ``.errno`` and become ``-errno`` replies.  Every method
raises ``OSError(ENOSYS)`` by default, so a filesystem implements only what it supports and
the guest learns the rest is missing (Linux stops sending some ops after one ENOSYS).

Names reaching a filesystem were checked by the server with the rules of :mod:`fuse.limits`
(non-empty, no ``/`` or NUL, at most NAME_MAX bytes, never ``.``/``..`` except in a LOOKUP after
the filesystem asked for ``FUSE_EXPORT_SUPPORT``).  A filesystem should still re-check with the
same functions (defence in depth), so both sides give the same errno.

Sessions: the server calls ``init()`` when the guest starts a FUSE session and ``destroy()`` when
it ends one (FUSE_DESTROY, a second INIT, a device reset).  ``fuse.session.Session`` is the only
caller of either, and always calls ``destroy()`` before a new ``init()`` on a filesystem that
served a session, so a filesystem never resets itself in ``init()``.

Lookup counts: every positive :class:`Entry` a filesystem returns counts one lookup the guest will
FORGET.  When the server cannot send one (the reply does not fit, an entry is malformed, a
READDIRPLUS page is full) it calls ``forget(nodeid, 1)`` itself, from one place
(``fuse.ops.undo_lookup``), so the counts stay balanced.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .io import Reader, Writer


def never_stop() -> bool:
    """The ``should_stop`` of a request nobody will stop (tests, direct calls)."""
    return False


class Context(NamedTuple):
    """Who caused the request (credentials from fuse_in_header), and whether to give up on it.

    ``should_stop()`` turns True when the transport stops serving (a device reset, the end of
    the process): the reply will not reach the guest, so a filesystem splitting a long call
    (a large FALLOCATE or COPY_FILE_RANGE) asks it between pieces and returns early. The server
    takes it from the transport per request (``Server.handle(..., should_stop=...)``), so a
    filesystem stays sans-IO and no global is involved.

    A NamedTuple rather than a frozen dataclass: one is built per request, and this is the
    cheapest immutable record Python has.
    """

    uid: int
    gid: int
    pid: int
    should_stop: Callable[[], bool] = never_stop


@dataclass(frozen=True, slots=True)
class InitReply:
    """What a filesystem supports, returned by :meth:`FileSystem.init` (crosvm: ``FsOptions``).

    ``flags`` are the FUSE_* INIT flags the filesystem wants.  The session keeps only those the
    guest offered and the server can carry (``fuse.session``), so a filesystem states what it
    supports without masking anything itself.  Optional operations are announced here, not
    guessed from which methods a class overrides: ask for ``FUSE_DO_READDIRPLUS`` (and
    ``FUSE_READDIRPLUS_AUTO``) only when :meth:`FileSystem.readdirplus` is implemented, and for
    ``FUSE_EXPORT_SUPPORT`` only when :meth:`FileSystem.lookup` answers ``.`` and ``..``.
    """

    flags: int = 0
    #: log2 of the alignment SETUPMAPPING/REMOVEMAPPING offsets need (fuse_init_out
    #: .map_alignment), sent when ``flags`` asks for ``FUSE_MAP_ALIGNMENT`` (a DAX window).
    map_alignment: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    """Result of a lookup-like operation.

    ``nodeid == 0`` is a *negative* entry: the guest caches "does not exist" for
    ``entry_timeout`` seconds without asking again (the reply is error=0, nodeid=0).  Each
    positive entry the server sends counts as one lookup the guest will later FORGET.
    """

    nodeid: int
    generation: int
    attr: os.stat_result | None
    entry_timeout: float
    attr_timeout: float

    @classmethod
    def negative(cls, timeout: float) -> Entry:
        return cls(nodeid=0, generation=0, attr=None, entry_timeout=timeout, attr_timeout=0.0)


class DirEntry(NamedTuple):
    """One directory entry: ``offset`` is the cookie of the *next* entry (where to resume)."""

    ino: int
    offset: int
    type: int  # DT_* (see fuse.abi)
    name: bytes


@dataclass(frozen=True, slots=True)
class SetattrRequest:
    """Decoded fuse_setattr_in; only fields whose FATTR_* bit is in ``valid`` are meaningful.

    ``fh`` is set only with FATTR_FH.  Times are nanoseconds since the epoch; ``*_now`` mean
    "use the current time" (FATTR_ATIME_NOW / FATTR_MTIME_NOW).
    """

    valid: int
    fh: int | None
    size: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    atime_now: bool
    mtime_now: bool


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


class FileSystem:
    """Base class: every operation answers ENOSYS until a subclass overrides it."""

    def init(self, capable: int) -> InitReply:
        """A session starts: ``capable`` is the guest's 64-bit FUSE_* flag set (read-only
        information; the session does the masking).  Called once per session, after
        ``destroy()`` of the previous one."""
        raise _enosys()

    def destroy(self) -> None:
        """The session ended: release everything it held (node ids, handles)."""
        raise _enosys()

    def close(self) -> None:
        """The filesystem will not serve again (its device is closed): release what outlives a
        session. Unlike the operations, not a request: the default does nothing."""

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise _enosys()

    def forget(self, nodeid: int, nlookup: int) -> None:
        raise _enosys()

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        raise _enosys()

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        raise _enosys()

    def setattr(self, ctx: Context, nodeid: int, req: SetattrRequest
                ) -> tuple[os.stat_result, float]:
        raise _enosys()

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        raise _enosys()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise _enosys()

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        """``rdev`` is the guest's 32-bit ``new_encode_dev`` value, equal to glibc's
        ``os.makedev`` encoding for majors < 4096."""
        raise _enosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise _enosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _enosys()

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        """``flags`` are RENAME_* (0 for plain FUSE_RENAME)."""
        raise _enosys()

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        raise _enosys()

    def open(self, ctx: Context, nodeid: int, flags: int, open_flags: int = 0
             ) -> tuple[int, int]:
        """Returns ``(fh, FOPEN_* flags)``.  ``open_flags`` is fuse_open_in.open_flags:
        ``FUSE_OPEN_KILL_SUIDGID`` asks to clear set-id bits when ``flags`` has O_TRUNC (only
        sent to a filesystem that asked for ``FUSE_HANDLE_KILLPRIV_V2``)."""
        raise _enosys()

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int, open_flags: int = 0) -> tuple[Entry, int, int]:
        """Returns ``(entry, fh, FOPEN_* flags)``; ``open_flags`` as for :meth:`open`."""
        raise _enosys()

    def read(self, ctx: Context, nodeid: int, fh: int, writer: Writer, size: int,
             offset: int) -> int:
        """Move up to ``size`` bytes into ``writer`` (``writer.write_from_fd``); return the count."""
        raise _enosys()

    def write(self, ctx: Context, nodeid: int, fh: int, reader: Reader, size: int,
              offset: int, write_flags: int) -> int:
        """Move ``size`` bytes from ``reader`` (``reader.read_to_fd``); return the count.
        ``FUSE_WRITE_KILL_SUIDGID`` in ``write_flags``: clear set-id bits first (the caller
        lacks CAP_FSETID; Linux sets it on direct-I/O writes, and on cached ones once the
        session has ``FUSE_HANDLE_KILLPRIV_V2``)."""
        raise _enosys()

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        raise _enosys()

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        raise _enosys()

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int,
                     flags: int, moffset: int) -> None:
        """DAX: map ``length`` bytes of the file at ``foffset`` at ``moffset`` of the device's
        shared memory window (``fh`` is u64 max when the guest maps by inode); ``flags`` are
        FUSE_SETUPMAPPING_FLAG_*.  Only a filesystem with a window implements it."""
        raise _enosys()

    def removemapping(self, ctx: Context, ranges: list[tuple[int, int]]) -> None:
        """DAX: unmap each ``(moffset, length)`` of the window (reads of it fault again)."""
        raise _enosys()

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        raise _enosys()

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        """Entries from ``offset`` on; the server stops consuming when the reply is full."""
        raise _enosys()

    def readdirplus(self, ctx: Context, nodeid: int, fh: int, offset: int
                    ) -> Iterator[tuple[DirEntry, Entry]]:
        """Like readdir with a looked-up Entry each; unsent entries are forgotten by the server."""
        raise _enosys()

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        raise _enosys()

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise _enosys()

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        raise _enosys()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        raise _enosys()

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        raise _enosys()

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        """``size == 0``: return the value's length; else the value (ERANGE if longer)."""
        raise _enosys()

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        """NUL-separated names; same size rule as getxattr."""
        raise _enosys()

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        raise _enosys()

    def fallocate(self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int,
                  length: int) -> None:
        raise _enosys()

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        """Returns the bytes copied; fewer than ``length`` is a legal (short) answer."""
        raise _enosys()

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """Write back everything the share's host file systems hold for it (a guest ``sync``
        or ``syncfs``); ``nodeid`` is the mount's root. Answered only once it is on storage."""
        raise _enosys()
