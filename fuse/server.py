"""FUSE request framing and dispatch: one request from a Reader, one reply to a Writer.

Sans-IO: ``Server.handle(reader, writer)`` takes one request from a :class:`~fuse.io.Reader`,
calls the filesystem, and writes the reply to a :class:`~fuse.io.Writer`.  It knows nothing of
virtqueues, so the virtio-fs worker, a /dev/fuse loop, tests and fuzzers all drive it the same way.

This module is the generic path every request takes; the rest lives where its job is named:

* :mod:`fuse.ops` -- the op table (per opcode: handler, request struct, names, reply kind);
* :mod:`fuse.session` -- INIT negotiation, the flag masks, the end of a session;
* :mod:`fuse.encode` -- attributes, entries, timeouts and directory records on the wire;
* :mod:`fuse.limits` -- the checks of names, xattrs and offsets (shared with filesystems);
* :mod:`fuse.observer` -- metrics and trace, fed through one injected observer;
* :mod:`fuse.logthrottle` -- log lines a guest can cause, rate-limited.

The guest is hostile: every length is checked before use, names are validated, and ``handle``
never raises.  A request that can be answered gets an error reply; one that cannot (no readable
header, no room for even an out-header, or a no-reply opcode) is dropped with a log line.
Several queue workers may call ``handle`` concurrently.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from . import abi
from .filesystem import Context, FileSystem, never_stop
from .io import BufferTooSmall, LimitedReader, Reader, Writer
from .limits import XATTR_NAME_MAX, XATTR_SIZE_MAX, RequestError
from .logthrottle import LogThrottle
from .metrics import Metrics
from .observer import Recorder, RequestObserver, op_name
from .ops import DATA, NO_REPLY, OPS, Drop, Reply
from .session import PAGE_SIZE, Session
from .trace import Trace

logger = logging.getLogger(__name__)

IN_HEADER_SIZE = abi.IN_HEADER.size
OUT_HEADER_SIZE = abi.OUT_HEADER.size
_IN_HEADER = abi.IN_HEADER.struct
_OUT_HEADER = abi.OUT_HEADER.struct
_KNOWN_OPCODES = frozenset(int(op) for op in abi.Opcode)
_INIT = int(abi.Opcode.INIT)
_NO_NAMES: list[bytes] = []  # never mutated


class Server:
    """Serve one FUSE session for ``fs``; ``handle()`` is safe to call from several threads.

    ``metrics`` and ``trace`` are shorthands for ``observer=Recorder(metrics, trace)``.
    """

    def __init__(self, fs: FileSystem, *, max_write: int = 1 << 20,
                 metrics: Metrics | None = None, trace: Trace | None = None,
                 observer: RequestObserver | None = None) -> None:
        if not (PAGE_SIZE <= max_write <= 0xFFFF * PAGE_SIZE):
            raise ValueError(f"max_write must be in [{PAGE_SIZE}, {0xFFFF * PAGE_SIZE}]")
        if observer is not None and (metrics is not None or trace is not None):
            raise ValueError("give an observer, or metrics/trace, not both")
        self.fs = fs
        self.max_write = max_write
        self._log = LogThrottle(logger)
        self.session = Session(fs, max_write, self._log)
        if observer is None and (metrics is not None or trace is not None):
            observer = Recorder(metrics, trace)
        self.observer = observer
        #: Largest request accepted: header + write_in + payload, where the payload bound also
        #: admits a maximal setxattr whatever max_write is.
        self.max_request = (IN_HEADER_SIZE + abi.WRITE_IN.size
                            + max(max_write, abi.SETXATTR_IN.size + XATTR_NAME_MAX + 1
                                  + XATTR_SIZE_MAX))

    @property
    def initialized(self) -> bool:
        return self.session.initialized

    @property
    def minor(self) -> int:
        return self.session.minor

    @property
    def flags(self) -> int:
        """The negotiated (enabled) INIT flags."""
        return self.session.flags

    def end_session(self) -> None:
        """The transport went away (device reset): end the session as a DESTROY would."""
        self.session.end()

    # ----------------------------------------------------------------------------------------
    # Entry point

    def handle(self, reader: Reader, writer: Writer, queue: int = 0,
               should_stop: Callable[[], bool] = never_stop) -> int:
        """Serve one request; returns the reply length written (0 when nothing was written).

        ``should_stop`` is the transport's "I am stopping" flag, handed to the filesystem in the
        request's Context so that a long operation can end early (see fuse.filesystem.Context).
        """
        observer = self.observer
        t0 = time.perf_counter_ns() if observer is not None else 0
        try:
            avail = reader.remaining()
            if avail < IN_HEADER_SIZE:
                raise BufferTooSmall(f"{avail} readable bytes")
            (length, opcode, unique, nodeid, uid, gid, pid, extlen,
             _pad) = _IN_HEADER.unpack(reader.read(IN_HEADER_SIZE))
        except Exception as e:  # noqa: BLE001 - a broken transport must not kill the worker
            self._log.warn("dropping request without a readable header: %s", e)
            if observer is not None:
                try:
                    observer.dropped(queue, None, 0, 0, None, time.perf_counter_ns() - t0)
                except Exception as oe:  # noqa: BLE001
                    self._log.bug("observer", oe)
            return 0

        op = OPS.get(opcode)
        no_reply = op is not None and op.reply is NO_REPLY
        names: list[bytes] = _NO_NAMES
        result: Any = None
        error = 0
        data_reply = False  # READ: the out-header slot is reserved and written last
        try:
            # Framing: the header against the buffers, then the op table's entry.
            room = writer.remaining()
            if not no_reply and room < OUT_HEADER_SIZE:
                raise Drop(f"no room for a reply ({room} writable bytes)")
            if length != avail or extlen or length > self.max_request:
                # Not the usual request that fills its buffers exactly: check it, cut extensions.
                reader = self._bound(reader, avail - IN_HEADER_SIZE, length, extlen)
            if op is None:
                # Known-but-unserved opcodes (locks, ioctl, DAX, TMPFILE...) are a normal
                # ENOSYS the guest learns from; an opcode outside the ABI is worth a log line.
                if opcode in _KNOWN_OPCODES:
                    raise OSError(errno.ENOSYS, "not implemented")
                raise RequestError(errno.ENOSYS, f"unknown opcode {opcode}")
            if not self.session.initialized and opcode != _INIT:
                raise RequestError(errno.EIO, "request before INIT")

            # What every op has in common: its struct, its names, room for its reply.
            arg = None
            layout = op.struct
            if layout is not None:
                arg = layout.tuple_type._make(layout.struct.unpack(reader.read(layout.size)))
            checks = op.names
            if checks:
                names = _split_names(reader, len(checks))  # the observer sees even bad ones
                for check, name in zip(checks, names, strict=True):
                    check(name)
            reply = op.reply
            if reply.size and room < OUT_HEADER_SIZE + reply.size:
                raise RequestError(errno.ENOMEM, f"reply needs {OUT_HEADER_SIZE + reply.size}"
                                                 f" bytes, {room} writable")
            if reply is DATA:  # zero-copy data first, its out-header last
                writer.skip(OUT_HEADER_SIZE)
                data_reply = True

            ctx = Context(uid, gid, pid, should_stop)
            result = op.handler(self, nodeid, ctx, arg, names, reader, writer)

            if no_reply:
                written = 0
            elif data_reply:
                written = OUT_HEADER_SIZE + result
                writer.write_at(0, _OUT_HEADER.pack(written, 0, unique))
            else:
                written = self._send(writer, unique, reply, ctx, arg, result)
            dropped = False
        except Drop as e:
            self._log.warn("dropping %s unique=%d: %s", op_name(opcode), unique, e)
            written, dropped = 0, True
        except Exception as e:  # noqa: BLE001 - every failure becomes an errno reply
            error = self._errno_for(e, opcode)
            result = None
            if no_reply:
                written, dropped = 0, True
            else:
                written = self._reply_error(writer, unique, error, data_reply)
                dropped = written == 0

        if observer is not None:
            elapsed = time.perf_counter_ns() - t0
            first = names[0] if names else None
            try:
                if dropped:
                    observer.dropped(queue, opcode, unique, nodeid, first, elapsed)
                else:
                    observer.handled(queue, opcode, unique, nodeid, first, error, result,
                                     elapsed)
            except Exception as e:  # noqa: BLE001 - the reply is out; counting must not fail it
                self._log.bug("observer", e)
        return written

    def _bound(self, reader: Reader, held: int, length: int, extlen: int) -> Reader:
        """The reader limited to the arguments ``in_header.len`` declares (extensions cut)."""
        if length < IN_HEADER_SIZE:
            raise RequestError(errno.EINVAL, f"header len {length} < {IN_HEADER_SIZE}")
        if length > self.max_request:
            raise RequestError(errno.ENOMEM, f"header len {length} > {self.max_request}")
        body = length - IN_HEADER_SIZE
        if body > held:
            raise RequestError(errno.EINVAL, f"header len {length} but only"
                                             f" {held + IN_HEADER_SIZE} bytes readable")
        ext = extlen * 8
        if ext > body:
            raise RequestError(errno.EINVAL, "total_extlen beyond the request")
        body -= ext
        return reader if body == held else LimitedReader(reader, body)

    def _send(self, writer: Writer, unique: int, reply: Reply, ctx: Context, arg: Any,
              result: Any) -> int:
        """Encode and write a successful reply; if it cannot be sent, undo what it holds."""
        try:
            encoder = reply.encode
            if encoder is not None:
                payload = encoder(result)
            else:
                payload = b"" if result is None else result
            total = OUT_HEADER_SIZE + len(payload)
            if writer.remaining() < total:
                raise RequestError(errno.ENOMEM, f"reply needs {total} bytes,"
                                                 f" {writer.remaining()} writable")
            writer.write(_OUT_HEADER.pack(total, 0, unique) + payload)
            return total
        except Exception:
            if reply.undo is not None:
                reply.undo(self, ctx, arg, result)
            raise

    # ----------------------------------------------------------------------------------------
    # Errors

    def _errno_for(self, e: BaseException, opcode: int) -> int:
        """The errno to reply for ``e``; what a guest or a filesystem bug caused is logged."""
        if isinstance(e, OSError):
            err = e.errno
            if isinstance(e, RequestError):
                self._log.warn("%s: %s -> %s", op_name(opcode), e.strerror,
                               errno.errorcode.get(err or 0, err))
            if isinstance(err, int) and 0 < err < 512:
                return err
            self._log.warn("%s: OSError without a usable errno (%r) -> EIO", op_name(opcode), e)
            return errno.EIO
        if isinstance(e, BufferTooSmall):
            self._log.warn("%s: truncated request: %s", op_name(opcode), e)
            return errno.EINVAL
        self._log.bug(op_name(opcode), e)
        return errno.EIO

    def _reply_error(self, writer: Writer, unique: int, err: int, at_start: bool) -> int:
        """``-err`` as the whole reply; ``at_start`` when the header slot was reserved (READ)."""
        header = _OUT_HEADER.pack(OUT_HEADER_SIZE, -err, unique)
        try:
            if at_start:
                writer.write_at(0, header)
                return OUT_HEADER_SIZE
            if writer.remaining() < OUT_HEADER_SIZE:
                self._log.warn("no room to reply errno %d to unique=%d", err, unique)
                return 0
            writer.write(header)
        except Exception as e:  # noqa: BLE001
            self._log.warn("could not write error reply for unique=%d: %s", unique, e)
            return 0
        return OUT_HEADER_SIZE


def _split_names(reader: Reader, count: int) -> list[bytes]:
    """Exactly ``count`` NUL-terminated strings filling the rest of the request (no interior
    NULs, nothing after the last one)."""
    parts = reader.read(reader.remaining()).split(b"\0")
    if len(parts) != count + 1 or parts[-1]:
        raise RequestError(errno.EINVAL, f"expected {count} NUL-terminated string(s)")
    del parts[-1]
    return parts
