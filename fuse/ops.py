"""The op table: for each FUSE opcode its handler, request struct, names and reply.

Like libfuse's ``fuse_ll_ops[]``, :data:`OPS` maps an opcode to an :class:`Op`.  The server's
generic path (``fuse.server``) does everything the entries have in common: it decodes ``struct``,
reads and checks the NUL-terminated ``names`` (one check function per name, from
:mod:`fuse.limits`), makes sure a fixed-size reply fits before the filesystem acts, then calls the
handler and writes the reply its :class:`Reply` kind encodes.  So a handler is only what is
particular to its opcode: the remaining argument checks and the filesystem call.

Handlers take ``(server, nodeid, ctx, arg, names, reader, writer)``: the header's node id and
credentials, the decoded request struct ``arg`` (None without one) and the checked ``names``.
They return the filesystem's result, which the reply kind encodes (and the observer sees).

Lookup counts: a positive entry the guest never receives must be given back.  The one function
that does so is :func:`undo_lookup`; the generic path calls it through ``Reply.undo`` when an
entry reply cannot be encoded or written, and READDIRPLUS calls it for entries it does not send.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from . import abi, encode
from .abi import Opcode
from .encode import NSEC, U32
from .filesystem import Context, Entry, FileSystem, SetattrRequest
from .io import Reader, Writer
from .limits import (
    DOT_NAMES,
    PATH_MAX,
    XATTR_LIST_MAX,
    XATTR_SIZE_MAX,
    RequestError,
    check_name,
    check_offset,
    check_symlink_target,
    check_xattr_name,
    check_xattr_size,
)
from .logthrottle import LogThrottle
from .mapping import removemapping, setupmapping
from .session import PAGE_SIZE

if TYPE_CHECKING:
    from .server import Server

logger = logging.getLogger(__name__)
#: What a request can make this module log (a filesystem that fails to undo, a malformed entry
#: it returns, again and again for every request) is sampled.
_log = LogThrottle(logger)

OUT_HEADER_SIZE = abi.OUT_HEADER.size
#: Largest copy_file_range length whose result still fits fuse_write_out.size (the kernel
#: applies the same clamp: UINT_MAX & PAGE_MASK).
MAX_COPY_LEN = U32 & ~(PAGE_SIZE - 1)
_RENAME_FLAGS = abi.RENAME_NOREPLACE | abi.RENAME_EXCHANGE | abi.RENAME_WHITEOUT
#: fuse_setxattr_in as sent without FUSE_SETXATTR_EXT: only its first two fields (size, flags).
_COMPAT_SETXATTR_IN = struct.Struct("<II")
_FORGET_ONE = abi.FORGET_ONE.struct


class Drop(Exception):
    """The request cannot be answered at all (it is dropped with a log line)."""


class Reply:
    """How a handler's result becomes the reply payload.

    ``size``: fixed payload size, checked before the handler runs so that a reply that cannot
    fit never makes the filesystem act (0: none, or variable).  ``encode``: result -> payload
    bytes (None: the result already is the payload, or None for an empty reply).  ``undo``:
    gives back what the result holds when its reply cannot be sent.  The kinds are the
    module constants below; NO_REPLY and DATA are told apart by identity.
    """

    __slots__ = ("name", "size", "encode", "undo")

    def __init__(self, name: str, size: int = 0, encode: Callable[[Any], bytes] | None = None,
                 undo: Callable[[Server, Context, Any, Any], None] | None = None) -> None:
        self.name = name
        self.size = size
        self.encode = encode
        self.undo = undo

    def __repr__(self) -> str:
        return f"Reply({self.name})"


class Op(NamedTuple):
    """One row of the table: what the generic path needs to know about an opcode."""

    handler: Callable[..., Any]
    struct: abi.Layout | None
    names: tuple[Callable[[bytes], bytes], ...]
    reply: Reply


def undo_lookup(fs: FileSystem, nodeid: Any) -> None:
    """Give back one lookup of ``nodeid`` that the guest never received (see module doc)."""
    if not isinstance(nodeid, int) or nodeid == 0:
        return
    try:
        fs.forget(nodeid, 1)
    except Exception as e:  # noqa: BLE001
        _log.warn("forget(%d, 1) of an unsent entry failed: %s", nodeid, e)


def _undo_entry(s: Server, ctx: Context, arg: Any, entry: Any) -> None:
    undo_lookup(s.fs, getattr(entry, "nodeid", 0))


def _undo_create(s: Server, ctx: Context, arg: Any, result: Any) -> None:
    entry, fh, _fopen = result
    nodeid = getattr(entry, "nodeid", 0)
    undo_lookup(s.fs, nodeid)
    try:
        s.fs.release(ctx, nodeid, fh, arg.flags)
    except Exception as e:  # noqa: BLE001
        _log.warn("release of an unsent CREATE handle failed: %s", e)


def need(writer: Writer, payload: int) -> None:
    """Fail early (before the filesystem acts) when a reply of ``payload`` bytes cannot fit."""
    if writer.remaining() < OUT_HEADER_SIZE + payload:
        raise RequestError(errno.ENOMEM, f"reply needs {OUT_HEADER_SIZE + payload} bytes,"
                                         f" {writer.remaining()} writable")


NO_REPLY = Reply("none")   # FORGET and friends: nothing is written
EMPTY = Reply("empty")     # just the out-header
BYTES = Reply("bytes")     # the handler returns the payload (variable size)
DATA = Reply("data")       # READ: the data goes to the writer after a reserved header slot
INIT = Reply("init", abi.INIT_OUT.size)
LOOKUP = Reply("lookup", abi.ENTRY_OUT.size, encode.lookup_out, _undo_entry)
NEW_ENTRY = Reply("entry", abi.ENTRY_OUT.size, encode.entry_out, _undo_entry)
CREATED = Reply("create", abi.ENTRY_OUT.size + abi.OPEN_OUT.size, encode.create_out,
                _undo_create)
ATTR = Reply("attr", abi.ATTR_OUT.size, encode.attr_out)
OPENED = Reply("open", abi.OPEN_OUT.size, encode.open_out)
COUNT = Reply("count", abi.WRITE_OUT.size, encode.write_out)
STATFS = Reply("statfs", abi.STATFS_OUT.size, encode.statfs_out)
OFFSET = Reply("offset", abi.LSEEK_OUT.size, encode.lseek_out)

Names = list[bytes]  # the checked names of a request, in wire order


def _lookup_name(name: bytes) -> bytes:
    """A LOOKUP's name: '.' and '..' are left to the handler (they need FUSE_EXPORT_SUPPORT)."""
    return name if name in DOT_NAMES else check_name(name)


NAME = (check_name,)
TWO_NAMES = (check_name, check_name)


# ------------------------------------------------------------------------------------------
# Session

def _init(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
          r: Reader, w: Writer) -> bytes:
    return s.session.init(r.read(min(r.remaining(), abi.INIT_IN.size)))


def _destroy(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> None:
    s.session.end()


# ------------------------------------------------------------------------------------------
# No-reply requests: nobody to tell about a failure

def _forget(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> None:
    try:
        s.fs.forget(nodeid, a.nlookup)
    except Exception as e:  # noqa: BLE001
        logger.debug("forget(%d, %d): %s", nodeid, a.nlookup, e)


def _batch_forget(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
                  r: Reader, w: Writer) -> None:
    size = _FORGET_ONE.size
    if a.count * size > r.remaining():
        raise Drop(f"BATCH_FORGET count {a.count} beyond {r.remaining()} bytes")
    items = list(_FORGET_ONE.iter_unpack(r.read(a.count * size)))
    try:
        s.fs.batch_forget(items)
    except Exception as e:  # noqa: BLE001
        logger.debug("batch_forget(%d items): %s", len(items), e)


def _ignore(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> None:
    # INTERRUPT: requests are served synchronously, so there is never anything to interrupt.
    # NOTIFY_REPLY: answers NOTIFY_RETRIEVE, which this server never sends.
    return None


# ------------------------------------------------------------------------------------------
# Names and attributes

def _lookup(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> Entry:
    name = names[0]
    if name in DOT_NAMES and not s.session.flags & abi.FUSE_EXPORT_SUPPORT:
        # Only NFS export (fuse_get_parent, fuse_get_dentry) looks these up.
        raise RequestError(errno.EINVAL, f"LOOKUP of {name!r} without FUSE_EXPORT_SUPPORT")
    return s.fs.lookup(ctx, nodeid, name)


def _getattr(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> Any:
    fh = a.fh if a.getattr_flags & abi.FUSE_GETATTR_FH else None
    return s.fs.getattr(ctx, nodeid, fh)


def _wire_time_ns(secs: int, nsec: int) -> int:
    """A u64 wire time_t (two's complement for times before 1970) and its nanoseconds."""
    return (secs - (1 << 64) if secs >> 63 else secs) * NSEC + nsec


def _setattr(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> Any:
    if a.atimensec >= NSEC or a.mtimensec >= NSEC:
        raise RequestError(errno.EINVAL, "nanoseconds out of range")
    if a.valid & abi.FATTR_SIZE:
        check_offset(a.size)
    req = SetattrRequest(
        valid=a.valid,
        fh=a.fh if a.valid & abi.FATTR_FH else None,
        size=a.size,
        mode=a.mode,
        uid=a.uid,
        gid=a.gid,
        atime_ns=_wire_time_ns(a.atime, a.atimensec),
        mtime_ns=_wire_time_ns(a.mtime, a.mtimensec),
        atime_now=bool(a.valid & abi.FATTR_ATIME_NOW),
        mtime_now=bool(a.valid & abi.FATTR_MTIME_NOW),
    )
    return s.fs.setattr(ctx, nodeid, req)


def _readlink(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
              r: Reader, w: Writer) -> bytes:
    target = s.fs.readlink(ctx, nodeid)
    if not isinstance(target, (bytes, bytearray)):
        raise TypeError(f"readlink() returned {type(target).__name__}")
    if len(target) >= PATH_MAX:
        raise RequestError(errno.ENAMETOOLONG, "link target too long for the guest")
    return bytes(target)


def _symlink(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> Any:
    name, target = names
    return s.fs.symlink(ctx, nodeid, name, target)


def _mknod(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
           r: Reader, w: Writer) -> Any:
    return s.fs.mknod(ctx, nodeid, names[0], a.mode, a.rdev, a.umask)


def _mkdir(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
           r: Reader, w: Writer) -> Any:
    return s.fs.mkdir(ctx, nodeid, names[0], a.mode, a.umask)


def _unlink(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> None:
    s.fs.unlink(ctx, nodeid, names[0])


def _rmdir(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
           r: Reader, w: Writer) -> None:
    s.fs.rmdir(ctx, nodeid, names[0])


def _rename(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> None:
    s.fs.rename(ctx, nodeid, names[0], a.newdir, names[1], 0)


def _rename2(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> None:
    if a.flags & ~_RENAME_FLAGS:
        raise RequestError(errno.EINVAL, f"unknown rename flags {a.flags:#x}")
    s.fs.rename(ctx, nodeid, names[0], a.newdir, names[1], a.flags)


def _link(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
          r: Reader, w: Writer) -> Any:
    return s.fs.link(ctx, a.oldnodeid, nodeid, names[0])


# ------------------------------------------------------------------------------------------
# Files

def _open(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
          r: Reader, w: Writer) -> Any:
    return s.fs.open(ctx, nodeid, a.flags, a.open_flags)


def _opendir(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> Any:
    return s.fs.opendir(ctx, nodeid, a.flags)


def _create(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> Any:
    entry, fh, fopen = s.fs.create(ctx, nodeid, names[0], a.mode, a.flags, a.umask,
                                   a.open_flags)
    return entry, fh, fopen


def _read(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
          r: Reader, w: Writer) -> int:
    if a.size > s.max_write:
        raise RequestError(errno.ENOMEM, f"READ of {a.size} > max_write")
    check_offset(a.offset)
    n = s.fs.read(ctx, nodeid, a.fh, w, a.size, a.offset)
    if not isinstance(n, int) or n < 0 or n > a.size or OUT_HEADER_SIZE + n > w.bytes_written:
        raise TypeError(f"read() returned {n!r} for size {a.size}, "
                        f"{w.bytes_written - OUT_HEADER_SIZE} bytes written")
    return n


def _write(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
           r: Reader, w: Writer) -> int:
    if a.size > s.max_write:
        raise RequestError(errno.ENOMEM, f"WRITE of {a.size} > max_write")
    if a.size > r.remaining():
        raise RequestError(errno.EINVAL, f"WRITE of {a.size} with {r.remaining()} bytes")
    check_offset(a.offset)
    n = s.fs.write(ctx, nodeid, a.fh, r, a.size, a.offset, a.write_flags)
    if not isinstance(n, int) or n < 0 or n > a.size:
        raise TypeError(f"write() returned {n!r} for size {a.size}")
    return n


def _statfs(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> Any:
    return s.fs.statfs(ctx, nodeid)


def _release(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> None:
    s.fs.release(ctx, nodeid, a.fh, a.flags)


def _releasedir(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
                r: Reader, w: Writer) -> None:
    s.fs.releasedir(ctx, nodeid, a.fh)


def _fsync(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
           r: Reader, w: Writer) -> None:
    s.fs.fsync(ctx, nodeid, a.fh, bool(a.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))


def _fsyncdir(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
              r: Reader, w: Writer) -> None:
    s.fs.fsyncdir(ctx, nodeid, a.fh, bool(a.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))


def _flush(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
           r: Reader, w: Writer) -> None:
    s.fs.flush(ctx, nodeid, a.fh, a.lock_owner)


def _syncfs(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> None:
    s.fs.syncfs(ctx, nodeid)


def _access(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
            r: Reader, w: Writer) -> None:
    s.fs.access(ctx, nodeid, a.mask)


def _fallocate(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
               r: Reader, w: Writer) -> None:
    check_offset(a.offset, a.length)
    s.fs.fallocate(ctx, nodeid, a.fh, a.mode, a.offset, a.length)


def _lseek(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
           r: Reader, w: Writer) -> int:
    check_offset(a.offset)
    return s.fs.lseek(ctx, nodeid, a.fh, a.offset, a.whence)


def _copy_file_range(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
                     r: Reader, w: Writer) -> int:
    check_offset(a.off_in, a.off_out)
    length = min(a.len, MAX_COPY_LEN)
    n = s.fs.copy_file_range(ctx, nodeid, a.fh_in, a.off_in, a.nodeid_out, a.fh_out,
                             a.off_out, length, a.flags)
    if not isinstance(n, int) or n < 0 or n > length:
        raise TypeError(f"copy_file_range() returned {n!r} for length {length}")
    return n


# ------------------------------------------------------------------------------------------
# Extended attributes

def _setxattr(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
              r: Reader, w: Writer) -> None:
    # The struct's size depends on the session, and the value after the name may hold NULs.
    if s.session.flags & abi.FUSE_SETXATTR_EXT:
        a = abi.SETXATTR_IN.unpack(r.read(abi.SETXATTR_IN.size))
        size, flags = a.size, a.flags
    else:
        size, flags = _COMPAT_SETXATTR_IN.unpack(r.read(_COMPAT_SETXATTR_IN.size))
    check_xattr_size(size)
    rest = r.read(r.remaining())
    nul = rest.find(b"\0")
    if nul < 0:
        raise RequestError(errno.EINVAL, "xattr name without NUL")
    name, value = check_xattr_name(rest[:nul]), rest[nul + 1:]
    if len(value) != size:
        raise RequestError(errno.EINVAL, f"xattr value is {len(value)} bytes, header says {size}")
    s.fs.setxattr(ctx, nodeid, name, value, flags)


def _xattr_reply(size: int, res: bytes | int) -> bytes:
    if size and isinstance(res, (bytes, bytearray)) and len(res) > size:
        raise OSError(errno.ERANGE, "xattr data larger than the guest's buffer")
    return encode.xattr_out(size, res)


def _getxattr(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
              r: Reader, w: Writer) -> bytes:
    if a.size > max(s.max_write, XATTR_SIZE_MAX):
        raise RequestError(errno.ENOMEM, f"GETXATTR size {a.size}")
    need(w, abi.GETXATTR_OUT.size if a.size == 0 else 0)
    return _xattr_reply(a.size, s.fs.getxattr(ctx, nodeid, names[0], a.size))


def _listxattr(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
               r: Reader, w: Writer) -> bytes:
    if a.size > max(s.max_write, XATTR_LIST_MAX):
        raise RequestError(errno.ENOMEM, f"LISTXATTR size {a.size}")
    need(w, abi.GETXATTR_OUT.size if a.size == 0 else 0)
    return _xattr_reply(a.size, s.fs.listxattr(ctx, nodeid, a.size))


def _removexattr(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
                 r: Reader, w: Writer) -> None:
    s.fs.removexattr(ctx, nodeid, names[0])


# ------------------------------------------------------------------------------------------
# Directories

def _readdir_limit(s: Server, a: Any, w: Writer) -> int:
    if a.size > s.max_write:
        raise RequestError(errno.ENOMEM, f"READDIR of {a.size} > max_write")
    return min(a.size, w.remaining() - OUT_HEADER_SIZE)


def _readdir(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
             r: Reader, w: Writer) -> bytes:
    limit = _readdir_limit(s, a, w)
    it = iter(s.fs.readdir(ctx, nodeid, a.fh, a.offset))
    buf = bytearray()
    try:
        while True:
            try:
                de = next(it)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001
                if not buf:
                    raise
                logger.debug("READDIR stopped early by %r; sending what we have", e)
                break
            if not encode.dirent_name_ok(de.name):
                _log.warn("READDIR: skipping invalid name %r", de.name)
                continue
            size = abi.dirent_size(len(de.name))
            if len(buf) + size > limit:
                break  # the guest resumes from the last sent entry's offset
            buf += encode.dirent(de, size)
    finally:
        _close_iter(it)
    return bytes(buf)


def _readdirplus(s: Server, nodeid: int, ctx: Context, a: Any, names: Names,
                 r: Reader, w: Writer) -> bytes:
    limit = _readdir_limit(s, a, w)
    entries = s.fs.readdirplus(ctx, nodeid, a.fh, a.offset)
    # A materialised list means every entry was already looked up: unsent ones must be
    # forgotten.  A lazy iterator is simply not advanced (nothing more was looked up).
    lazy = iter(entries) is entries
    it = iter(entries)
    buf = bytearray()
    fs = s.fs
    try:
        while True:
            try:
                de, entry = next(it)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001
                if not buf:
                    raise
                logger.debug("READDIRPLUS stopped early by %r; sending what we have", e)
                break
            name = getattr(de, "name", None)
            if not encode.dirent_name_ok(name):
                _log.warn("READDIRPLUS: skipping invalid name %r", name)
                undo_lookup(fs, getattr(entry, "nodeid", 0))
                continue
            size = abi.direntplus_size(len(name))
            if len(buf) + size > limit:
                undo_lookup(fs, getattr(entry, "nodeid", 0))
                if not lazy:
                    for _de, rest in it:
                        undo_lookup(fs, getattr(rest, "nodeid", 0))
                break
            try:
                record = encode.direntplus(de, entry, size)
            except Exception:
                undo_lookup(fs, getattr(entry, "nodeid", 0))
                if not buf:
                    raise
                _log.warn("READDIRPLUS: bad entry for %r; truncating reply", name)
                break
            buf += record
    finally:
        _close_iter(it)
    return bytes(buf)


def _close_iter(it: Iterator[Any]) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        try:
            close()
        except Exception as e:  # noqa: BLE001
            logger.debug("closing a directory iterator failed: %s", e)


# ------------------------------------------------------------------------------------------
# The table (opcodes absent here -- locks, ioctl, DAX, TMPFILE... -- are answered ENOSYS)

_TABLE: dict[Opcode, Op] = {
    Opcode.INIT: Op(_init, None, (), INIT),
    Opcode.DESTROY: Op(_destroy, None, (), EMPTY),
    Opcode.FORGET: Op(_forget, abi.FORGET_IN, (), NO_REPLY),
    Opcode.BATCH_FORGET: Op(_batch_forget, abi.BATCH_FORGET_IN, (), NO_REPLY),
    Opcode.INTERRUPT: Op(_ignore, abi.INTERRUPT_IN, (), NO_REPLY),
    Opcode.NOTIFY_REPLY: Op(_ignore, None, (), NO_REPLY),
    Opcode.LOOKUP: Op(_lookup, None, (_lookup_name,), LOOKUP),
    Opcode.GETATTR: Op(_getattr, abi.GETATTR_IN, (), ATTR),
    Opcode.SETATTR: Op(_setattr, abi.SETATTR_IN, (), ATTR),
    Opcode.READLINK: Op(_readlink, None, (), BYTES),
    Opcode.SYMLINK: Op(_symlink, None, (check_name, check_symlink_target), NEW_ENTRY),
    Opcode.MKNOD: Op(_mknod, abi.MKNOD_IN, NAME, NEW_ENTRY),
    Opcode.MKDIR: Op(_mkdir, abi.MKDIR_IN, NAME, NEW_ENTRY),
    Opcode.UNLINK: Op(_unlink, None, NAME, EMPTY),
    Opcode.RMDIR: Op(_rmdir, None, NAME, EMPTY),
    Opcode.RENAME: Op(_rename, abi.RENAME_IN, TWO_NAMES, EMPTY),
    Opcode.RENAME2: Op(_rename2, abi.RENAME2_IN, TWO_NAMES, EMPTY),
    Opcode.LINK: Op(_link, abi.LINK_IN, NAME, NEW_ENTRY),
    Opcode.OPEN: Op(_open, abi.OPEN_IN, (), OPENED),
    Opcode.CREATE: Op(_create, abi.CREATE_IN, NAME, CREATED),
    Opcode.READ: Op(_read, abi.READ_IN, (), DATA),
    Opcode.WRITE: Op(_write, abi.WRITE_IN, (), COUNT),
    Opcode.STATFS: Op(_statfs, None, (), STATFS),
    Opcode.RELEASE: Op(_release, abi.RELEASE_IN, (), EMPTY),
    Opcode.FSYNC: Op(_fsync, abi.FSYNC_IN, (), EMPTY),
    Opcode.FLUSH: Op(_flush, abi.FLUSH_IN, (), EMPTY),
    Opcode.SETXATTR: Op(_setxattr, None, (), EMPTY),
    Opcode.GETXATTR: Op(_getxattr, abi.GETXATTR_IN, (check_xattr_name,), BYTES),
    Opcode.LISTXATTR: Op(_listxattr, abi.GETXATTR_IN, (), BYTES),
    Opcode.REMOVEXATTR: Op(_removexattr, None, (check_xattr_name,), EMPTY),
    Opcode.OPENDIR: Op(_opendir, abi.OPEN_IN, (), OPENED),
    Opcode.READDIR: Op(_readdir, abi.READ_IN, (), BYTES),
    Opcode.READDIRPLUS: Op(_readdirplus, abi.READ_IN, (), BYTES),
    Opcode.RELEASEDIR: Op(_releasedir, abi.RELEASE_IN, (), EMPTY),
    Opcode.FSYNCDIR: Op(_fsyncdir, abi.FSYNC_IN, (), EMPTY),
    Opcode.ACCESS: Op(_access, abi.ACCESS_IN, (), EMPTY),
    Opcode.FALLOCATE: Op(_fallocate, abi.FALLOCATE_IN, (), EMPTY),
    Opcode.LSEEK: Op(_lseek, abi.LSEEK_IN, (), OFFSET),
    Opcode.COPY_FILE_RANGE: Op(_copy_file_range, abi.COPY_FILE_RANGE_IN, (), COUNT),
    Opcode.SYNCFS: Op(_syncfs, abi.SYNCFS_IN, (), EMPTY),
    Opcode.SETUPMAPPING: Op(setupmapping, abi.SETUPMAPPING_IN, (), EMPTY),      # DAX window
    Opcode.REMOVEMAPPING: Op(removemapping, abi.REMOVEMAPPING_IN, (), EMPTY),
}
#: opcode (a plain int, as read from the wire) -> Op
OPS: dict[int, Op] = {int(opcode): op for opcode, op in _TABLE.items()}
