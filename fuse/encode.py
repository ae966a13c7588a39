"""Reply encoding: timeouts, attributes, entries, open/statfs replies and directory records.

Pure functions from the Python values a :class:`~fuse.filesystem.FileSystem` returns to the bytes
of the reply payload (the out-header is the server's).  They validate what they pack, because a
filesystem bug must become an EIO reply, not a malformed one: a wrong type raises ``TypeError``.

Each runs once or more per request, so the wire structs are precompiled and the conversions are
inlined rather than split into helper calls.
"""

from __future__ import annotations

import functools
import os
from typing import TypeGuard

from . import abi
from .filesystem import DirEntry, Entry

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
NSEC = 1_000_000_000

_ENTRY_OUT = abi.ENTRY_OUT.struct
_ATTR_OUT = abi.ATTR_OUT.struct
_OPEN_OUT = abi.OPEN_OUT.struct
_WRITE_OUT = abi.WRITE_OUT.struct
_DIRENT = abi.DIRENT.struct
_ZERO_ATTR = (0,) * len(abi.ATTR.fields)
_NAME_OFFSET = abi.FUSE_NAME_OFFSET


@functools.lru_cache(maxsize=256)
def split_timeout(seconds: float) -> tuple[int, int]:
    """Seconds (float) -> (secs, nsec) for the wire; negative/NaN -> 0, huge -> u64 max.

    Cached: a filesystem answers with one or two distinct timeouts, over and over.
    """
    if not seconds > 0:  # also catches NaN
        return 0, 0
    if seconds >= 2.0 ** 64:
        return U64, 0
    secs = int(seconds)
    nsec = int(round((seconds - secs) * NSEC))
    if nsec >= NSEC:
        secs, nsec = secs + 1, nsec - NSEC
    return min(secs, U64), nsec


def encode_dev(dev: int) -> int:
    """Host dev_t -> the kernel's 32-bit ``new_encode_dev`` format used in fuse_attr.rdev."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & U32


def attr_values(st: os.stat_result) -> tuple[int, ...]:
    """os.stat_result -> the fuse_attr field values, in wire order."""
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    # A stat_result built from a bare 10-tuple (tests) has no ns fields: whole seconds only.
    if a is None:
        a = int(st[7]) * NSEC
    if m is None:
        m = int(st[8]) * NSEC
    if c is None:
        c = int(st[9]) * NSEC
    a, an = divmod(a, NSEC)
    m, mn = divmod(m, NSEC)
    c, cn = divmod(c, NSEC)
    rdev = st.st_rdev
    return (
        st.st_ino & U64, st.st_size & U64, (st.st_blocks or 0) & U64,
        a & U64, m & U64, c & U64, an, mn, cn,
        st.st_mode & U32, min(st.st_nlink, U32), st.st_uid & U32, st.st_gid & U32,
        encode_dev(rdev) if rdev else 0, (st.st_blksize or 0) & U32, 0,
    )


def entry_out(e: Entry, *, negative_ok: bool = False) -> bytes:
    """fuse_entry_out; ``negative_ok`` admits nodeid 0 ("does not exist", LOOKUP only)."""
    if not isinstance(e, Entry):
        raise TypeError(f"filesystem returned {type(e).__name__}, not Entry")
    ev, evn = split_timeout(e.entry_timeout)
    av, avn = split_timeout(e.attr_timeout)
    if e.nodeid == 0:
        if not negative_ok:
            raise TypeError("negative Entry where a new node is required")
        return _ENTRY_OUT.pack(0, e.generation & U64, ev, av, evn, avn, *_ZERO_ATTR)
    if e.attr is None:
        raise TypeError("positive Entry without attr")
    return _ENTRY_OUT.pack(e.nodeid & U64, e.generation & U64, ev, av, evn, avn,
                           *attr_values(e.attr))


def lookup_out(e: Entry) -> bytes:
    return entry_out(e, negative_ok=True)


def attr_out(result: tuple[os.stat_result, float]) -> bytes:
    """fuse_attr_out from getattr/setattr's ``(stat, timeout)``."""
    st, timeout = result
    secs, nsec = split_timeout(timeout)
    return _ATTR_OUT.pack(secs, nsec, 0, *attr_values(st))


def open_out(result: tuple[int, int]) -> bytes:
    """fuse_open_out from open/opendir's ``(fh, FOPEN_* flags)``."""
    fh, fopen = result
    return _OPEN_OUT.pack(fh & U64, fopen & U32, 0)


def create_out(result: tuple[Entry, int, int]) -> bytes:
    """fuse_entry_out + fuse_open_out from create's ``(entry, fh, FOPEN_* flags)``."""
    entry, fh, fopen = result
    return entry_out(entry) + _OPEN_OUT.pack(fh & U64, fopen & U32, 0)


def write_out(count: int) -> bytes:
    """fuse_write_out (WRITE, COPY_FILE_RANGE): bytes moved."""
    return _WRITE_OUT.pack(count, 0)


def statfs_out(s: os.statvfs_result) -> bytes:
    return abi.KSTATFS.struct.pack(
        s.f_blocks & U64, s.f_bfree & U64, s.f_bavail & U64, s.f_files & U64,
        s.f_ffree & U64, s.f_bsize & U32, s.f_namemax & U32, s.f_frsize & U32, 0,
        *(0,) * 6)


def lseek_out(pos: int) -> bytes:
    return abi.LSEEK_OUT.struct.pack(pos & U64)


def xattr_out(size: int, res: bytes | int) -> bytes:
    """GETXATTR/LISTXATTR: the length when the guest asked with size 0, else the bytes."""
    if size == 0:
        if isinstance(res, (bytes, bytearray)):
            res = len(res)
        if not isinstance(res, int) or not 0 <= res <= U32:
            raise TypeError(f"xattr size query returned {res!r}")
        return abi.GETXATTR_OUT.struct.pack(res, 0)
    if not isinstance(res, (bytes, bytearray)):
        raise TypeError(f"xattr read returned {type(res).__name__}, not bytes")
    return bytes(res)


def dirent_name_ok(name: object) -> TypeGuard[bytes]:
    """A name the guest will parse in a dirent (fs/fuse/readdir.c: 1..FUSE_NAME_MAX, no '/')."""
    return (type(name) is bytes and 0 < len(name) <= abi.FUSE_NAME_MAX
            and b"/" not in name and b"\0" not in name)


def dirent(de: DirEntry, size: int) -> bytes:
    """One fuse_dirent record of ``size`` (= abi.dirent_size) bytes, padding included."""
    name = de.name
    return (_DIRENT.pack(de.ino & U64, de.offset & U64, len(name), de.type & U32) + name
            + bytes(size - _NAME_OFFSET - len(name)))


def direntplus(de: DirEntry, entry: Entry, size: int) -> bytes:
    """One fuse_direntplus record of ``size`` (= abi.direntplus_size) bytes.

    nodeid 0 (``.``, ``..``) means "no entry for this name" here, not "does not exist".
    """
    name = de.name
    return (entry_out(entry, negative_ok=True)
            + _DIRENT.pack(de.ino & U64, de.offset & U64, len(name), de.type & U32) + name
            + bytes(size - abi.FUSE_NAME_OFFSET_DIRENTPLUS - len(name)))
