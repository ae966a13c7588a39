"""FUSE request decoding, dispatch to a :class:`~fuse.filesystem.FileSystem`, reply encoding.

Sans-IO: ``Server.handle(reader, writer)`` takes one request from a :class:`~fuse.io.Reader`,
calls the filesystem, and writes the reply to a :class:`~fuse.io.Writer`.  It knows nothing of
virtqueues, so the virtio-fs worker, tests and fuzzers all drive it the same way.

The guest is hostile: every length is checked before use, names are validated, and
``handle`` never raises.  A request that can be answered gets an error reply; one that cannot
(no readable header, no room for even an out-header, or a no-reply opcode) is dropped with a
log line.  Several queue workers may call ``handle`` concurrently.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from typing import Any, Callable, Iterator

from . import abi
from .abi import Opcode
from .filesystem import Context, Entry, FileSystem, SetattrRequest
from .io import BufferTooSmall, Reader, Writer
from .metrics import Metrics
from .trace import Trace

logger = logging.getLogger(__name__)

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
I64_MAX = (1 << 63) - 1
NSEC = 1_000_000_000
#: Guest page size; used to size max_pages (x86-64 guests only).
PAGE_SIZE = 4096
#: Largest copy_file_range length whose result still fits fuse_write_out.size (the kernel
#: applies the same clamp: UINT_MAX & PAGE_MASK).
MAX_COPY_LEN = U32 & ~(PAGE_SIZE - 1)

IN_HEADER_SIZE = abi.IN_HEADER.size
OUT_HEADER_SIZE = abi.OUT_HEADER.size
_OUT_HEADER = abi.OUT_HEADER.struct
_ENTRY_OUT = abi.ENTRY_OUT.struct
_ATTR_OUT = abi.ATTR_OUT.struct
_OPEN_OUT = abi.OPEN_OUT.struct
_DIRENT = abi.DIRENT.struct
_ZERO_ATTR = (0,) * len(abi.ATTR.tuple_type._fields)

#: Flags the server itself implements and offers whenever the guest is capable.
SERVER_FLAGS = (
    abi.FUSE_ASYNC_READ
    | abi.FUSE_BIG_WRITES
    | abi.FUSE_PARALLEL_DIROPS
    | abi.FUSE_MAX_PAGES
    | abi.FUSE_INIT_EXT
)
#: Flags offered when the filesystem overrides ``readdirplus``.
READDIRPLUS_FLAGS = abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO
#: Flags a filesystem may ask for in ``init``: the server can carry what they imply.  Anything
#: else (locks, ioctl, DAX, security contexts, KILLPRIV_V2, splice) needs wire support we do
#: not have and is never advertised, whatever the filesystem asks.
FS_NEGOTIABLE_FLAGS = (
    SERVER_FLAGS
    | READDIRPLUS_FLAGS
    | abi.FUSE_ATOMIC_O_TRUNC
    | abi.FUSE_EXPORT_SUPPORT
    | abi.FUSE_DONT_MASK
    | abi.FUSE_AUTO_INVAL_DATA
    | abi.FUSE_ASYNC_DIO
    | abi.FUSE_WRITEBACK_CACHE
    | abi.FUSE_NO_OPEN_SUPPORT
    | abi.FUSE_HANDLE_KILLPRIV
    | abi.FUSE_POSIX_ACL
    | abi.FUSE_ABORT_ERROR
    | abi.FUSE_CACHE_SYMLINKS
    | abi.FUSE_NO_OPENDIR_SUPPORT
    | abi.FUSE_EXPLICIT_INVAL_DATA
    | abi.FUSE_SUBMOUNTS
    | abi.FUSE_SETXATTR_EXT
)

_RENAME_FLAGS = abi.RENAME_NOREPLACE | abi.RENAME_EXCHANGE | abi.RENAME_WHITEOUT


class _Errno(Exception):
    """Internal: answer the current request with ``-errno``."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why)
        self.err = err
        self.why = why


class _Drop(Exception):
    """Internal: the request cannot be answered at all."""


class _LimitedReader:
    """A Reader that exposes only the first ``limit`` bytes of another one.

    Used when ``in_header.len`` says the request is shorter than the readable buffer, so that
    trailing bytes (or 7.38 request extensions) are never taken as arguments or file data.
    """

    __slots__ = ("_inner", "_left")

    def __init__(self, inner: Reader, limit: int) -> None:
        self._inner = inner
        self._left = limit

    def remaining(self) -> int:
        return self._left

    def read(self, size: int) -> bytes:
        if size < 0 or size > self._left:
            raise BufferTooSmall(f"read {size} with {self._left} left")
        data = self._inner.read(size)
        self._left -= size
        return data

    def read_to_fd(self, fd: int, size: int, offset: int) -> int:
        n = self._inner.read_to_fd(fd, max(0, min(size, self._left)), offset)
        self._left -= n
        return n


class _Rec:
    """Per-request facts collected for metrics and trace."""

    __slots__ = ("name", "reply_nodeid", "error")

    def __init__(self) -> None:
        self.name: bytes | None = None
        self.reply_nodeid: int | None = None
        self.error = 0  # set by handlers that wrote their own error reply (READ)


def split_timeout(seconds: float) -> tuple[int, int]:
    """Seconds (float) -> (secs, nsec) for the wire; negative/NaN -> 0, huge -> u64 max."""
    if not seconds > 0:  # also catches NaN
        return 0, 0
    if seconds >= 2.0 ** 64:
        return U64, 0
    secs = int(seconds)
    nsec = int(round((seconds - secs) * NSEC))
    if nsec >= NSEC:
        secs, nsec = secs + 1, nsec - NSEC
    return min(secs, U64), nsec


def _encode_dev(dev: int) -> int:
    """Host dev_t -> the kernel's 32-bit ``new_encode_dev`` format used in fuse_attr.rdev."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & U32


def _time_parts(st: os.stat_result, ns_attr: str, idx: int) -> tuple[int, int]:
    ns = getattr(st, ns_attr, None)
    if ns is None:  # stat_result built from a bare 10-tuple (tests): whole seconds only
        ns = int(st[idx]) * NSEC
    secs, nsec = divmod(ns, NSEC)
    return secs & U64, nsec


def attr_tuple(st: os.stat_result) -> tuple[int, ...]:
    """os.stat_result -> flat fuse_attr field values."""
    a, an = _time_parts(st, "st_atime_ns", 7)
    m, mn = _time_parts(st, "st_mtime_ns", 8)
    c, cn = _time_parts(st, "st_ctime_ns", 9)
    blocks = getattr(st, "st_blocks", None)
    blksize = getattr(st, "st_blksize", None)
    rdev = getattr(st, "st_rdev", None)
    return (
        st.st_ino & U64, st.st_size & U64, (blocks or 0) & U64, a, m, c, an, mn, cn,
        st.st_mode & U32, min(st.st_nlink, U32), st.st_uid & U32, st.st_gid & U32,
        _encode_dev(rdev) if rdev else 0, (blksize or 0) & U32, 0,
    )


def _pack_entry(e: Entry, *, allow_negative: bool) -> bytes:
    if not isinstance(e, Entry):
        raise TypeError(f"filesystem returned {type(e).__name__}, not Entry")
    ev, evn = split_timeout(e.entry_timeout)
    av, avn = split_timeout(e.attr_timeout)
    if e.nodeid == 0:
        if not allow_negative:
            raise TypeError("negative Entry where a new node is required")
        return _ENTRY_OUT.pack(0, e.generation & U64, ev, av, evn, avn, *_ZERO_ATTR)
    if e.attr is None:
        raise TypeError("positive Entry without attr")
    return _ENTRY_OUT.pack(e.nodeid & U64, e.generation & U64, ev, av, evn, avn,
                           *attr_tuple(e.attr))


_OP_NAMES = {int(op): op.name for op in Opcode}


def _op_name(opcode: int) -> str:
    return _OP_NAMES.get(opcode, "UNKNOWN")


def _check_component(name: bytes, *, allow_dots: bool) -> None:
    """A single path component: non-empty, no '/', (optionally) not '.' or '..'."""
    if not name:
        raise _Errno(errno.EINVAL, "empty name")
    if b"/" in name:
        raise _Errno(errno.EINVAL, "name contains '/'")
    if len(name) > abi.FUSE_NAME_MAX:
        raise _Errno(errno.ENAMETOOLONG, "name too long")
    if not allow_dots and name in (b".", b".."):
        raise _Errno(errno.EINVAL, "'.' or '..' not allowed here")


def _split_cstrings(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` NUL-terminated strings filling ``data`` (no interior NULs)."""
    parts = data.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise _Errno(errno.EINVAL, f"expected {count} NUL-terminated string(s)")
    return parts[:-1]


class Server:
    """Serve one FUSE session for ``fs``; ``handle()`` is safe to call from several threads."""

    def __init__(self, fs: FileSystem, *, max_write: int = 1 << 20,
                 metrics: Metrics | None = None, trace: Trace | None = None) -> None:
        if not (PAGE_SIZE <= max_write <= 0xFFFF * PAGE_SIZE):
            raise ValueError(f"max_write must be in [{PAGE_SIZE}, {0xFFFF * PAGE_SIZE}]")
        self.fs = fs
        self.max_write = max_write
        self.metrics = metrics
        self.trace = trace
        #: Largest request accepted: header + write_in + payload, where the payload bound also
        #: admits a maximal setxattr whatever max_write is.
        self.max_request = (IN_HEADER_SIZE + abi.WRITE_IN.size
                            + max(max_write, abi.SETXATTR_IN.size + abi.XATTR_NAME_MAX + 1
                                  + abi.XATTR_SIZE_MAX))
        self._init_lock = threading.Lock()
        self._initialized = False
        self.minor = 0
        self.flags = 0  # negotiated (enabled) INIT flags
        self._log_lock = threading.Lock()
        self._logged_bugs: set[tuple[str, type]] = set()
        self._warnings = 0
        self._handlers: dict[int, Callable[..., int]] = {
            Opcode.INIT: self._init,
            Opcode.DESTROY: self._destroy,
            Opcode.LOOKUP: self._lookup,
            Opcode.FORGET: self._forget,
            Opcode.BATCH_FORGET: self._batch_forget,
            Opcode.INTERRUPT: self._interrupt,
            Opcode.NOTIFY_REPLY: self._notify_reply,
            Opcode.GETATTR: self._getattr,
            Opcode.SETATTR: self._setattr,
            Opcode.READLINK: self._readlink,
            Opcode.SYMLINK: self._symlink,
            Opcode.MKNOD: self._mknod,
            Opcode.MKDIR: self._mkdir,
            Opcode.UNLINK: self._unlink,
            Opcode.RMDIR: self._rmdir,
            Opcode.RENAME: self._rename,
            Opcode.RENAME2: self._rename2,
            Opcode.LINK: self._link,
            Opcode.OPEN: self._open,
            Opcode.CREATE: self._create,
            Opcode.READ: self._read,
            Opcode.WRITE: self._write,
            Opcode.STATFS: self._statfs,
            Opcode.RELEASE: self._release,
            Opcode.FSYNC: self._fsync,
            Opcode.FLUSH: self._flush,
            Opcode.SETXATTR: self._setxattr,
            Opcode.GETXATTR: self._getxattr,
            Opcode.LISTXATTR: self._listxattr,
            Opcode.REMOVEXATTR: self._removexattr,
            Opcode.OPENDIR: self._opendir,
            Opcode.READDIR: self._readdir,
            Opcode.READDIRPLUS: self._readdirplus,
            Opcode.RELEASEDIR: self._releasedir,
            Opcode.FSYNCDIR: self._fsyncdir,
            Opcode.ACCESS: self._access,
            Opcode.FALLOCATE: self._fallocate,
            Opcode.LSEEK: self._lseek,
            Opcode.COPY_FILE_RANGE: self._copy_file_range,
        }

    @property
    def initialized(self) -> bool:
        return self._initialized

    # ----------------------------------------------------------------------------------------
    # Entry point

    def handle(self, reader: Reader, writer: Writer, queue: int = 0) -> int:
        """Serve one request; returns the reply length written (0 when nothing was written)."""
        t0 = time.perf_counter_ns()
        try:
            avail = reader.remaining()
            if avail < IN_HEADER_SIZE:
                raise BufferTooSmall(f"{avail} readable bytes")
            hdr = abi.IN_HEADER.unpack(reader.read(IN_HEADER_SIZE))
        except Exception as e:  # noqa: BLE001 - a broken transport must not kill the worker
            self._warn("dropping request without a readable header: %s", e)
            if self.metrics is not None:
                self.metrics.record_dropped()
            return 0

        rec = _Rec()
        opcode = hdr.opcode
        op = _op_name(opcode)
        no_reply = opcode in abi.NO_REPLY_OPCODES
        error = 0
        dropped = False
        try:
            written = self._dispatch(hdr, reader, writer, rec, no_reply)
            error = rec.error
        except _Drop as e:
            self._warn("dropping %s unique=%d: %s", op, hdr.unique, e)
            written, dropped = 0, True
        except Exception as e:  # noqa: BLE001 - every failure becomes an errno reply
            error = self._errno_for(e, op)
            if no_reply:
                written, dropped = 0, True
            else:
                written = self._reply_error(writer, hdr.unique, error)
                dropped = written == 0

        if dropped:
            error = 0
        us = (time.perf_counter_ns() - t0) / 1000.0
        metrics = self.metrics
        if metrics is not None:
            if dropped:
                metrics.record_dropped(op)
            else:
                metrics.record_request(op, error)
            if opcode == Opcode.LOOKUP and not dropped:
                metrics.record_lookup(rec.name, rec.reply_nodeid, error)
        if self.trace is not None:
            self.trace.record(queue=queue, op=op if op != "UNKNOWN" else f"OP_{opcode}",
                              unique=hdr.unique, nodeid=hdr.nodeid, name=rec.name,
                              error=error, us=us)
        return written

    def _dispatch(self, hdr: Any, reader: Reader, writer: Writer, rec: _Rec,
                  no_reply: bool) -> int:
        if not no_reply and writer.remaining() < OUT_HEADER_SIZE:
            raise _Drop(f"no room for a reply ({writer.remaining()} writable bytes)")
        if hdr.len < IN_HEADER_SIZE:
            raise _Errno(errno.EINVAL, f"header len {hdr.len} < {IN_HEADER_SIZE}")
        if hdr.len > self.max_request:
            raise _Errno(errno.ENOMEM, f"header len {hdr.len} > {self.max_request}")
        body = hdr.len - IN_HEADER_SIZE
        held = reader.remaining()
        if body > held:
            raise _Errno(errno.EINVAL, f"header len {hdr.len} but only {held + IN_HEADER_SIZE}"
                                       " bytes readable")
        ext = hdr.total_extlen * 8
        if ext > body:
            raise _Errno(errno.EINVAL, "total_extlen beyond the request")
        body -= ext
        if body != held:
            reader = _LimitedReader(reader, body)
        handler = self._handlers.get(hdr.opcode)
        if handler is None:
            # Known-but-unserved opcodes (locks, ioctl, DAX, SYNCFS...) are a normal ENOSYS
            # the guest learns from; an opcode outside the ABI is worth a log line.
            raise _Errno(errno.ENOSYS,
                         "" if hdr.opcode in _OP_NAMES else f"unknown opcode {hdr.opcode}")
        if not self._initialized and hdr.opcode != Opcode.INIT:
            raise _Errno(errno.EIO, "request before INIT")
        ctx = Context(hdr.uid, hdr.gid, hdr.pid)
        return handler(hdr, ctx, reader, writer, rec)

    # ----------------------------------------------------------------------------------------
    # Helpers

    def _warn(self, msg: str, *args: Any) -> None:
        """Log malformed-request warnings without letting a hostile guest flood the log."""
        with self._log_lock:
            self._warnings += 1
            n = self._warnings
        if n <= 50 or (n & (n - 1)) == 0:
            logger.warning(msg + (" (%d malformed so far)" % n if n > 50 else ""), *args)

    def _errno_for(self, e: BaseException, op: str) -> int:
        if isinstance(e, _Errno):
            if e.why:
                self._warn("%s: %s -> %s", op, e.why, errno.errorcode.get(e.err, e.err))
            return e.err
        if isinstance(e, BufferTooSmall):
            self._warn("%s: truncated request: %s", op, e)
            return errno.EINVAL
        if isinstance(e, OSError):
            err = e.errno
            if isinstance(err, int) and 0 < err < 512:
                return err
            logger.warning("%s: OSError without a usable errno (%r) -> EIO", op, e)
            return errno.EIO
        key = (op, type(e))
        with self._log_lock:
            first = key not in self._logged_bugs
            self._logged_bugs.add(key)
        if first:
            logger.error("%s: unexpected %s, replying EIO", op, type(e).__name__, exc_info=e)
        else:
            logger.warning("%s: unexpected %s again (%s), replying EIO", op,
                           type(e).__name__, e)
        return errno.EIO

    def _reply_error(self, writer: Writer, unique: int, err: int) -> int:
        try:
            if writer.remaining() < OUT_HEADER_SIZE:
                self._warn("no room to reply errno %d to unique=%d", err, unique)
                return 0
            writer.write(_OUT_HEADER.pack(OUT_HEADER_SIZE, -err, unique))
        except Exception as e:  # noqa: BLE001
            self._warn("could not write error reply for unique=%d: %s", unique, e)
            return 0
        return OUT_HEADER_SIZE

    @staticmethod
    def _need(writer: Writer, payload: int) -> None:
        """Fail early (before the filesystem acts) when a fixed-size reply cannot fit."""
        if writer.remaining() < OUT_HEADER_SIZE + payload:
            raise _Errno(errno.ENOMEM, f"reply needs {OUT_HEADER_SIZE + payload} bytes,"
                                       f" {writer.remaining()} writable")

    @staticmethod
    def _reply(writer: Writer, unique: int, payload: bytes = b"") -> int:
        total = OUT_HEADER_SIZE + len(payload)
        if writer.remaining() < total:
            raise _Errno(errno.ENOMEM, f"reply needs {total} bytes,"
                                       f" {writer.remaining()} writable")
        writer.write(_OUT_HEADER.pack(total, 0, unique) + payload)
        return total

    def _reply_entry(self, writer: Writer, unique: int, entry: Entry, extra: bytes = b"",
                     *, allow_negative: bool = False) -> int:
        """Send an entry; if it cannot be sent, undo the lookup the filesystem counted."""
        try:
            return self._reply(writer, unique,
                               _pack_entry(entry, allow_negative=allow_negative) + extra)
        except Exception:
            self._forget_quietly(getattr(entry, "nodeid", 0))
            raise

    def _forget_quietly(self, nodeid: int) -> None:
        if not isinstance(nodeid, int) or nodeid == 0:
            return
        try:
            self.fs.forget(nodeid, 1)
        except Exception as e:  # noqa: BLE001
            logger.warning("forget(%d, 1) of an unsent entry failed: %s", nodeid, e)

    @staticmethod
    def _read_struct(reader: Reader, layout: abi.Layout) -> Any:
        return layout.unpack(reader.read(layout.size))

    @staticmethod
    def _rest(reader: Reader) -> bytes:
        return reader.read(reader.remaining())

    def _read_names(self, reader: Reader, count: int, rec: _Rec) -> list[bytes]:
        names = _split_cstrings(self._rest(reader), count)
        rec.name = names[0]
        return names

    @staticmethod
    def _check_offset(*values: int) -> None:
        for v in values:
            if v > I64_MAX:
                raise _Errno(errno.EINVAL, f"offset/length {v} exceeds loff_t")

    # ----------------------------------------------------------------------------------------
    # Session

    def _init(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        body = reader.read(min(reader.remaining(), abi.INIT_IN.size))
        if len(body) < abi.FUSE_COMPAT_INIT_IN_SIZE:
            raise _Errno(errno.EINVAL, f"fuse_init_in of {len(body)} bytes")
        major, minor, max_readahead, flags = struct.unpack_from("<4I", body)
        if major < abi.FUSE_KERNEL_VERSION:
            raise _Errno(errno.EPROTO, f"guest FUSE major {major}")
        self._need(writer, abi.INIT_OUT.size)
        if major > abi.FUSE_KERNEL_VERSION:
            # Tell the guest which major we speak; it may retry with that one.
            logger.warning("INIT: guest FUSE major %d, answering 7.%d", major,
                           abi.FUSE_KERNEL_MINOR_VERSION)
            return self._reply(writer, hdr.unique, abi.INIT_OUT.pack(
                major=abi.FUSE_KERNEL_VERSION, minor=abi.FUSE_KERNEL_MINOR_VERSION))
        if minor < abi.FUSE_MIN_MINOR_VERSION:
            raise _Errno(errno.EPROTO, f"guest FUSE 7.{minor} < 7.{abi.FUSE_MIN_MINOR_VERSION}")
        capable = flags
        if flags & abi.FUSE_INIT_EXT:
            if len(body) < abi.INIT_IN.size:
                raise _Errno(errno.EINVAL, "FUSE_INIT_EXT without flags2")
            capable |= abi.INIT_IN.unpack(body).flags2 << 32

        with self._init_lock:
            if self._initialized:
                # A new guest kernel (reboot, remount) starts a new session on the same device.
                logger.info("INIT on an initialized session: destroying the previous one")
                self._initialized = False
                try:
                    self.fs.destroy()
                except Exception as e:  # noqa: BLE001
                    logger.warning("destroy before re-INIT failed: %s", e)
            want = self.fs.init(capable)
            if not isinstance(want, int):
                raise TypeError(f"init() returned {type(want).__name__}, not int")
            offer = SERVER_FLAGS | (want & FS_NEGOTIABLE_FLAGS)
            if type(self.fs).readdirplus is not FileSystem.readdirplus:
                offer |= READDIRPLUS_FLAGS
            enabled = capable & offer
            if enabled & abi.FUSE_WRITEBACK_CACHE:
                # With a writeback cache the guest cannot rely on the server to kill suid bits.
                enabled &= ~abi.FUSE_HANDLE_KILLPRIV
            if not enabled & abi.FUSE_INIT_EXT:
                enabled &= U32
            minor_out = min(minor, abi.FUSE_KERNEL_MINOR_VERSION)
            max_pages = min(0xFFFF, -(-self.max_write // PAGE_SIZE))
            reply = abi.INIT_OUT.pack(
                major=abi.FUSE_KERNEL_VERSION, minor=minor_out, max_readahead=max_readahead,
                flags=enabled & U32, max_background=0xFFFF, congestion_threshold=49149,
                max_write=self.max_write, time_gran=1, max_pages=max_pages,
                map_alignment=0, flags2=enabled >> 32)
            self.minor = minor_out
            self.flags = enabled
            self._initialized = True
        logger.info("FUSE session 7.%d: flags %#x (guest %#x, fs wants %#x), max_write %d",
                    minor_out, enabled, capable, want, self.max_write)
        return self._reply(writer, hdr.unique, reply)

    def _destroy(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        with self._init_lock:
            self._initialized = False
            try:
                self.fs.destroy()
            except Exception as e:  # noqa: BLE001 - the guest is going away either way
                logger.warning("destroy failed: %s", e)
        return self._reply(writer, hdr.unique)

    # ----------------------------------------------------------------------------------------
    # No-reply requests

    def _forget(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.FORGET_IN)
        try:
            self.fs.forget(hdr.nodeid, arg.nlookup)
        except Exception as e:  # noqa: BLE001 - nobody to tell
            logger.debug("forget(%d, %d): %s", hdr.nodeid, arg.nlookup, e)
        return 0

    def _batch_forget(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                      rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.BATCH_FORGET_IN)
        size = abi.FORGET_ONE.size
        if arg.count * size > reader.remaining():
            raise _Drop(f"BATCH_FORGET count {arg.count} beyond {reader.remaining()} bytes")
        data = reader.read(arg.count * size)
        items = [(n, c) for n, c in struct.iter_unpack("<QQ", data)]
        try:
            self.fs.batch_forget(items)
        except Exception as e:  # noqa: BLE001
            logger.debug("batch_forget(%d items): %s", len(items), e)
        return 0

    def _interrupt(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                   rec: _Rec) -> int:
        # Requests are served synchronously, so there is never anything to interrupt.
        self._read_struct(reader, abi.INTERRUPT_IN)
        return 0

    def _notify_reply(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                      rec: _Rec) -> int:
        # Answers NOTIFY_RETRIEVE, which this server never sends.
        return 0

    # ----------------------------------------------------------------------------------------
    # Names and attributes

    def _lookup(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        (name,) = self._read_names(reader, 1, rec)
        # '.' and '..' are legitimate here (NFS export asks for them); the fs decides.
        _check_component(name, allow_dots=True)
        self._need(writer, abi.ENTRY_OUT.size)
        entry = self.fs.lookup(ctx, hdr.nodeid, name)
        written = self._reply_entry(writer, hdr.unique, entry, allow_negative=True)
        rec.reply_nodeid = entry.nodeid
        return written

    def _getattr(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.GETATTR_IN)
        fh = arg.fh if arg.getattr_flags & abi.FUSE_GETATTR_FH else None
        self._need(writer, abi.ATTR_OUT.size)
        st, timeout = self.fs.getattr(ctx, hdr.nodeid, fh)
        return self._reply_attr(writer, hdr.unique, st, timeout)

    def _reply_attr(self, writer: Writer, unique: int, st: os.stat_result,
                    timeout: float) -> int:
        secs, nsec = split_timeout(timeout)
        return self._reply(writer, unique, _ATTR_OUT.pack(secs, nsec, 0, *attr_tuple(st)))

    def _setattr(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        a = self._read_struct(reader, abi.SETATTR_IN)
        if a.atimensec >= NSEC or a.mtimensec >= NSEC:
            raise _Errno(errno.EINVAL, "nanoseconds out of range")
        signed = lambda v: v - (1 << 64) if v > I64_MAX else v  # noqa: E731 - wire time_t
        req = SetattrRequest(
            valid=a.valid,
            fh=a.fh if a.valid & abi.FATTR_FH else None,
            size=a.size,
            mode=a.mode,
            uid=a.uid,
            gid=a.gid,
            atime_ns=signed(a.atime) * NSEC + a.atimensec,
            mtime_ns=signed(a.mtime) * NSEC + a.mtimensec,
            atime_now=bool(a.valid & abi.FATTR_ATIME_NOW),
            mtime_now=bool(a.valid & abi.FATTR_MTIME_NOW),
        )
        if a.valid & abi.FATTR_SIZE:
            self._check_offset(a.size)
        self._need(writer, abi.ATTR_OUT.size)
        st, timeout = self.fs.setattr(ctx, hdr.nodeid, req)
        return self._reply_attr(writer, hdr.unique, st, timeout)

    def _readlink(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                  rec: _Rec) -> int:
        target = self.fs.readlink(ctx, hdr.nodeid)
        if not isinstance(target, (bytes, bytearray)):
            raise TypeError(f"readlink() returned {type(target).__name__}")
        if len(target) >= abi.PATH_MAX:
            raise _Errno(errno.ENAMETOOLONG, "link target too long for the guest")
        return self._reply(writer, hdr.unique, bytes(target))

    def _symlink(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        name, target = self._read_names(reader, 2, rec)
        _check_component(name, allow_dots=False)
        if not target:
            raise _Errno(errno.ENOENT, "empty symlink target")
        if len(target) >= abi.PATH_MAX:
            raise _Errno(errno.ENAMETOOLONG, "symlink target too long")
        self._need(writer, abi.ENTRY_OUT.size)
        entry = self.fs.symlink(ctx, hdr.nodeid, name, target)
        return self._reply_entry(writer, hdr.unique, entry)

    def _mknod(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.MKNOD_IN)
        (name,) = self._read_names(reader, 1, rec)
        _check_component(name, allow_dots=False)
        self._need(writer, abi.ENTRY_OUT.size)
        entry = self.fs.mknod(ctx, hdr.nodeid, name, arg.mode, arg.rdev, arg.umask)
        return self._reply_entry(writer, hdr.unique, entry)

    def _mkdir(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.MKDIR_IN)
        (name,) = self._read_names(reader, 1, rec)
        _check_component(name, allow_dots=False)
        self._need(writer, abi.ENTRY_OUT.size)
        entry = self.fs.mkdir(ctx, hdr.nodeid, name, arg.mode, arg.umask)
        return self._reply_entry(writer, hdr.unique, entry)

    def _unlink(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                rec: _Rec) -> int:
        (name,) = self._read_names(reader, 1, rec)
        _check_component(name, allow_dots=False)
        self.fs.unlink(ctx, hdr.nodeid, name)
        return self._reply(writer, hdr.unique)

    def _rmdir(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        (name,) = self._read_names(reader, 1, rec)
        _check_component(name, allow_dots=False)
        self.fs.rmdir(ctx, hdr.nodeid, name)
        return self._reply(writer, hdr.unique)

    def _do_rename(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec,
                   newdir: int, flags: int) -> int:
        if flags & ~_RENAME_FLAGS:
            raise _Errno(errno.EINVAL, f"unknown rename flags {flags:#x}")
        name, newname = self._read_names(reader, 2, rec)
        _check_component(name, allow_dots=False)
        _check_component(newname, allow_dots=False)
        self.fs.rename(ctx, hdr.nodeid, name, newdir, newname, flags)
        return self._reply(writer, hdr.unique)

    def _rename(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.RENAME_IN)
        return self._do_rename(hdr, ctx, reader, writer, rec, arg.newdir, 0)

    def _rename2(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.RENAME2_IN)
        return self._do_rename(hdr, ctx, reader, writer, rec, arg.newdir, arg.flags)

    def _link(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.LINK_IN)
        (newname,) = self._read_names(reader, 1, rec)
        _check_component(newname, allow_dots=False)
        self._need(writer, abi.ENTRY_OUT.size)
        entry = self.fs.link(ctx, arg.oldnodeid, hdr.nodeid, newname)
        return self._reply_entry(writer, hdr.unique, entry)

    # ----------------------------------------------------------------------------------------
    # Files

    def _open(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.OPEN_IN)
        self._need(writer, abi.OPEN_OUT.size)
        fh, fopen = self.fs.open(ctx, hdr.nodeid, arg.flags)
        return self._reply(writer, hdr.unique, _OPEN_OUT.pack(fh & U64, fopen & U32, 0))

    def _opendir(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.OPEN_IN)
        self._need(writer, abi.OPEN_OUT.size)
        fh, fopen = self.fs.opendir(ctx, hdr.nodeid, arg.flags)
        return self._reply(writer, hdr.unique, _OPEN_OUT.pack(fh & U64, fopen & U32, 0))

    def _create(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.CREATE_IN)
        (name,) = self._read_names(reader, 1, rec)
        _check_component(name, allow_dots=False)
        self._need(writer, abi.ENTRY_OUT.size + abi.OPEN_OUT.size)
        entry, fh, fopen = self.fs.create(ctx, hdr.nodeid, name, arg.mode, arg.flags, arg.umask)
        try:
            extra = _OPEN_OUT.pack(fh & U64, fopen & U32, 0)
            return self._reply_entry(writer, hdr.unique, entry, extra)
        except Exception:
            try:
                self.fs.release(ctx, getattr(entry, "nodeid", 0), fh, arg.flags)
            except Exception as e:  # noqa: BLE001
                logger.warning("release of an unsent CREATE handle failed: %s", e)
            raise

    def _read(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.READ_IN)
        if arg.size > self.max_write:
            raise _Errno(errno.ENOMEM, f"READ of {arg.size} > max_write")
        self._check_offset(arg.offset)
        writer.skip(OUT_HEADER_SIZE)  # room checked by _dispatch
        try:
            n = self.fs.read(ctx, hdr.nodeid, arg.fh, writer, arg.size, arg.offset)
            if not isinstance(n, int) or n < 0 or n > arg.size \
                    or OUT_HEADER_SIZE + n > writer.bytes_written:
                raise TypeError(f"read() returned {n!r} for size {arg.size}, "
                                f"{writer.bytes_written - OUT_HEADER_SIZE} bytes written")
        except Exception as e:  # noqa: BLE001 - the header slot is already reserved
            err = self._errno_for(e, "READ")
            writer.write_at(0, _OUT_HEADER.pack(OUT_HEADER_SIZE, -err, hdr.unique))
            rec.error = err
            return OUT_HEADER_SIZE
        total = OUT_HEADER_SIZE + n
        writer.write_at(0, _OUT_HEADER.pack(total, 0, hdr.unique))
        if self.metrics is not None:
            self.metrics.add_bytes_read(n)
        return total

    def _write(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.WRITE_IN)
        if arg.size > self.max_write:
            raise _Errno(errno.ENOMEM, f"WRITE of {arg.size} > max_write")
        if arg.size > reader.remaining():
            raise _Errno(errno.EINVAL, f"WRITE of {arg.size} with {reader.remaining()} bytes")
        self._check_offset(arg.offset)
        self._need(writer, abi.WRITE_OUT.size)
        n = self.fs.write(ctx, hdr.nodeid, arg.fh, reader, arg.size, arg.offset,
                          arg.write_flags)
        if not isinstance(n, int) or n < 0 or n > arg.size:
            raise TypeError(f"write() returned {n!r} for size {arg.size}")
        if self.metrics is not None:
            self.metrics.add_bytes_written(n)
        return self._reply(writer, hdr.unique, abi.WRITE_OUT.struct.pack(n, 0))

    def _statfs(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                rec: _Rec) -> int:
        self._need(writer, abi.STATFS_OUT.size)
        s = self.fs.statfs(ctx, hdr.nodeid)
        payload = abi.KSTATFS.struct.pack(
            s.f_blocks & U64, s.f_bfree & U64, s.f_bavail & U64, s.f_files & U64,
            s.f_ffree & U64, s.f_bsize & U32, s.f_namemax & U32, s.f_frsize & U32, 0,
            *(0,) * 6)
        return self._reply(writer, hdr.unique, payload)

    def _release(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.RELEASE_IN)
        self.fs.release(ctx, hdr.nodeid, arg.fh, arg.flags)
        return self._reply(writer, hdr.unique)

    def _releasedir(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                    rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.RELEASE_IN)
        self.fs.releasedir(ctx, hdr.nodeid, arg.fh)
        return self._reply(writer, hdr.unique)

    def _fsync(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.FSYNC_IN)
        self.fs.fsync(ctx, hdr.nodeid, arg.fh, bool(arg.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))
        return self._reply(writer, hdr.unique)

    def _fsyncdir(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                  rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.FSYNC_IN)
        self.fs.fsyncdir(ctx, hdr.nodeid, arg.fh,
                         bool(arg.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))
        return self._reply(writer, hdr.unique)

    def _flush(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.FLUSH_IN)
        self.fs.flush(ctx, hdr.nodeid, arg.fh, arg.lock_owner)
        return self._reply(writer, hdr.unique)

    def _access(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.ACCESS_IN)
        self.fs.access(ctx, hdr.nodeid, arg.mask)
        return self._reply(writer, hdr.unique)

    def _fallocate(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                   rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.FALLOCATE_IN)
        self._check_offset(arg.offset, arg.length)
        self.fs.fallocate(ctx, hdr.nodeid, arg.fh, arg.mode, arg.offset, arg.length)
        return self._reply(writer, hdr.unique)

    def _lseek(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer, rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.LSEEK_IN)
        self._check_offset(arg.offset)
        self._need(writer, abi.LSEEK_OUT.size)
        pos = self.fs.lseek(ctx, hdr.nodeid, arg.fh, arg.offset, arg.whence)
        return self._reply(writer, hdr.unique, abi.LSEEK_OUT.struct.pack(pos & U64))

    def _copy_file_range(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                         rec: _Rec) -> int:
        a = self._read_struct(reader, abi.COPY_FILE_RANGE_IN)
        self._check_offset(a.off_in, a.off_out)
        self._need(writer, abi.WRITE_OUT.size)
        length = min(a.len, MAX_COPY_LEN)
        n = self.fs.copy_file_range(ctx, hdr.nodeid, a.fh_in, a.off_in, a.nodeid_out,
                                    a.fh_out, a.off_out, length, a.flags)
        if not isinstance(n, int) or n < 0 or n > length:
            raise TypeError(f"copy_file_range() returned {n!r} for length {length}")
        return self._reply(writer, hdr.unique, abi.WRITE_OUT.struct.pack(n, 0))

    # ----------------------------------------------------------------------------------------
    # Extended attributes

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        # Not a path component: '/' is legal in xattr names.
        if not name:
            raise _Errno(errno.EINVAL, "empty xattr name")
        if len(name) > abi.XATTR_NAME_MAX:
            raise _Errno(errno.ERANGE, "xattr name too long")

    def _setxattr(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                  rec: _Rec) -> int:
        if self.flags & abi.FUSE_SETXATTR_EXT:
            arg = self._read_struct(reader, abi.SETXATTR_IN)
            size, flags = arg.size, arg.flags
        else:
            size, flags = struct.unpack("<II", reader.read(abi.FUSE_COMPAT_SETXATTR_IN_SIZE))
        if size > abi.XATTR_SIZE_MAX:
            raise _Errno(errno.E2BIG, f"xattr value of {size} bytes")
        rest = self._rest(reader)
        nul = rest.find(b"\0")
        if nul < 0:
            raise _Errno(errno.EINVAL, "xattr name without NUL")
        name, value = rest[:nul], rest[nul + 1:]
        rec.name = name
        self._check_xattr_name(name)
        if len(value) != size:
            raise _Errno(errno.EINVAL, f"xattr value is {len(value)} bytes, header says {size}")
        self.fs.setxattr(ctx, hdr.nodeid, name, value, flags)
        return self._reply(writer, hdr.unique)

    def _reply_xattr(self, writer: Writer, unique: int, size: int, res: bytes | int) -> int:
        if size == 0:
            if isinstance(res, (bytes, bytearray)):
                res = len(res)
            if not isinstance(res, int) or not 0 <= res <= U32:
                raise TypeError(f"xattr size query returned {res!r}")
            return self._reply(writer, unique, abi.GETXATTR_OUT.struct.pack(res, 0))
        if not isinstance(res, (bytes, bytearray)):
            raise TypeError(f"xattr read returned {type(res).__name__}, not bytes")
        if len(res) > size:
            raise _Errno(errno.ERANGE)
        return self._reply(writer, unique, bytes(res))

    def _getxattr(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                  rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.GETXATTR_IN)
        (name,) = self._read_names(reader, 1, rec)
        self._check_xattr_name(name)
        if arg.size > max(self.max_write, abi.XATTR_SIZE_MAX):
            raise _Errno(errno.ENOMEM, f"GETXATTR size {arg.size}")
        self._need(writer, abi.GETXATTR_OUT.size if arg.size == 0 else 0)
        res = self.fs.getxattr(ctx, hdr.nodeid, name, arg.size)
        return self._reply_xattr(writer, hdr.unique, arg.size, res)

    def _listxattr(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                   rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.GETXATTR_IN)
        if arg.size > max(self.max_write, abi.XATTR_LIST_MAX):
            raise _Errno(errno.ENOMEM, f"LISTXATTR size {arg.size}")
        self._need(writer, abi.GETXATTR_OUT.size if arg.size == 0 else 0)
        res = self.fs.listxattr(ctx, hdr.nodeid, arg.size)
        return self._reply_xattr(writer, hdr.unique, arg.size, res)

    def _removexattr(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                     rec: _Rec) -> int:
        (name,) = self._read_names(reader, 1, rec)
        self._check_xattr_name(name)
        self.fs.removexattr(ctx, hdr.nodeid, name)
        return self._reply(writer, hdr.unique)

    # ----------------------------------------------------------------------------------------
    # Directories

    def _readdir_limit(self, arg: Any, writer: Writer) -> int:
        if arg.size > self.max_write:
            raise _Errno(errno.ENOMEM, f"READDIR of {arg.size} > max_write")
        return min(arg.size, writer.remaining() - OUT_HEADER_SIZE)

    @staticmethod
    def _dirent_name_ok(name: Any) -> bool:
        return (isinstance(name, bytes) and 0 < len(name) <= abi.FUSE_NAME_MAX
                and b"/" not in name and b"\0" not in name)

    def _readdir(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                 rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.READ_IN)
        limit = self._readdir_limit(arg, writer)
        entries = self.fs.readdir(ctx, hdr.nodeid, arg.fh, arg.offset)
        buf = bytearray()
        it = iter(entries)
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
                name = de.name
                if not self._dirent_name_ok(name):
                    logger.warning("READDIR: skipping invalid name %r", name)
                    continue
                size = abi.dirent_size(len(name))
                if len(buf) + size > limit:
                    break  # the guest resumes from the last sent entry's offset
                buf += _DIRENT.pack(de.ino & U64, de.offset & U64, len(name), de.type & U32)
                buf += name
                buf += bytes(size - abi.FUSE_NAME_OFFSET - len(name))
        finally:
            _close_iter(it)
        return self._reply(writer, hdr.unique, bytes(buf))

    def _readdirplus(self, hdr: Any, ctx: Context, reader: Reader, writer: Writer,
                     rec: _Rec) -> int:
        arg = self._read_struct(reader, abi.READ_IN)
        limit = self._readdir_limit(arg, writer)
        entries = self.fs.readdirplus(ctx, hdr.nodeid, arg.fh, arg.offset)
        # A materialised list means every entry was already looked up: unsent ones must be
        # forgotten.  A lazy iterator is simply not advanced (nothing more was looked up).
        lazy = iter(entries) is entries
        it = iter(entries)
        buf = bytearray()
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
                nodeid = getattr(entry, "nodeid", 0)
                name = getattr(de, "name", None)
                if not self._dirent_name_ok(name):
                    logger.warning("READDIRPLUS: skipping invalid name %r", name)
                    self._forget_quietly(nodeid)
                    continue
                size = abi.direntplus_size(len(name))
                if len(buf) + size > limit:
                    self._forget_quietly(nodeid)
                    if not lazy:
                        for _de, rest_entry in it:
                            self._forget_quietly(getattr(rest_entry, "nodeid", 0))
                    break
                try:
                    # nodeid 0 (e.g. '.'/'..') means "no entry for this name", not ENOENT.
                    packed = _pack_entry(entry, allow_negative=True)
                    packed += _DIRENT.pack(de.ino & U64, de.offset & U64, len(name),
                                           de.type & U32)
                except Exception:
                    self._forget_quietly(nodeid)
                    if not buf:
                        raise
                    logger.warning("READDIRPLUS: bad entry for %r; truncating reply", name)
                    break
                buf += packed
                buf += name
                buf += bytes(size - abi.FUSE_NAME_OFFSET_DIRENTPLUS - len(name))
        finally:
            _close_iter(it)
        return self._reply(writer, hdr.unique, bytes(buf))


def _close_iter(it: Iterator[Any]) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        try:
            close()
        except Exception as e:  # noqa: BLE001
            logger.debug("closing a directory iterator failed: %s", e)
