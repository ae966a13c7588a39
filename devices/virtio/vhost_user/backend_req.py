"""The back-end request channel for virtio-fs DAX: FS_MAP / FS_UNMAP, both ends.

A sandboxed fs device runs in a jailed child; the DAX window is guest-physical memory backed by a
reserved mapping in the *VMM's* address space (a KVM memory slot), which the child cannot touch.
vhost-user has the channel for this (QEMU's DAX series, rust-vmm's `vhost` crate, crosvm,
virtiofsd's DAX branch): with VHOST_USER_PROTOCOL_F_SLAVE_REQ ("BACKEND_REQ" in newer texts)
the front-end makes a socketpair and hands one end to the back-end with SET_SLAVE_REQ_FD; on it
the back-end sends *requests* to the front-end. VHOST_USER_SLAVE_FS_MAP (6) carries a
``VhostUserFSSlaveMsg`` -- eight entries of {fd_offset, c_offset, len, flags}, see protocol.py --
and the file's descriptor as SCM_RIGHTS; VHOST_USER_SLAVE_FS_UNMAP (7) the same struct without
a descriptor. With REPLY_ACK (which we require) each is answered with a u64: 0, or the errno.

- ``BackendChannel`` (the child's end) is the ``DaxMapper`` of the child's ``DaxWindow``: the
  window keeps its usual bookkeeping (owners, intervals) and every map/unmap becomes one request,
  sent from the FUSE worker thread, which waits for the ack (bounded by a timeout; a channel that
  broke makes later requests fail with EIO: a late ack could otherwise be taken for the next one).
- ``FsMapServer`` (the VMM's end) serves the channel on a thread and applies each request to the
  VMM's own ``DaxWindow`` (a ``LocalMapper``: memory slot, SHM registers, truncation repair).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading

from fuse.logthrottle import LogThrottle

from .connection import Connection, ConnectionClosed, Interrupted
from .protocol import (
    FS_BACKEND_ENTRIES,
    FS_FLAG_MAP_R,
    FS_FLAG_MAP_W,
    FS_UNMAP_ALL,
    BackendRequest,
    FsMapEntry,
    Message,
    ProtocolError,
    backend_request_name,
    decode_fs_backend_msg,
    decode_u64,
    encode_fs_backend_msg,
    encode_reply,
    encode_request,
    encode_u64,
)

logger = logging.getLogger(__name__)

#: How long the child waits for the VMM's ack of one FS_MAP/FS_UNMAP.
ACK_TIMEOUT = 10.0
_MAX_ERRNO = 4095


class BackendChannel:
    """The back-end's end of the channel, as the ``DaxMapper`` of its DAX window.

    Made before the session exists (the device is built first); ``connect(fd)`` is called when
    SET_SLAVE_REQ_FD arrives, ``disconnect()`` when the session ends. Until then every request
    fails with ENODEV: the guest's SETUPMAPPING gets an error, not a mapping nobody can see.
    """

    keeps_files = False      # only the VMM's window needs the files (truncation repair)
    host_addr = 0            # no mapping in this process

    def __init__(self, timeout: float = ACK_TIMEOUT) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._broken: str | None = None
        self.requests = 0
        self.failures = 0

    # -- session ------------------------------------------------------------------------------
    def connect(self, fd: int) -> None:
        """Take ownership of the channel socket ``fd`` (from SET_SLAVE_REQ_FD)."""
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_UNIX:
            sock.detach()
            raise ValueError("the back-end request channel must be a Unix stream socket")
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = Connection(sock, timeout=self.timeout)
            self._broken = None

    def disconnect(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._broken is None

    # -- DaxMapper ----------------------------------------------------------------------------
    def map(self, moffset: int, length: int, fd: int, foffset: int, writable: bool) -> None:
        flags = FS_FLAG_MAP_R | (FS_FLAG_MAP_W if writable else 0)
        self.request(BackendRequest.FS_MAP, [FsMapEntry(foffset, moffset, length, flags)], [fd])

    def unmap(self, moffset: int, length: int) -> None:
        self.request(BackendRequest.FS_UNMAP, [FsMapEntry(0, moffset, length, 0)])

    def zero_fill(self, moffset: int, length: int, writable: bool) -> None:
        raise OSError(errno.EOPNOTSUPP, "truncation repair is the VMM's (it owns the mapping)")

    def close(self) -> None:
        self.disconnect()

    # -- the exchange -------------------------------------------------------------------------
    def request(self, request: BackendRequest, entries: list[FsMapEntry],
                fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one request and wait for its ack; OSError(errno) when the VMM refused it."""
        name = backend_request_name(request)
        payload = encode_fs_backend_msg(entries)
        with self._lock:
            self.requests += 1
            conn = self._conn
            if conn is None:
                self.failures += 1
                raise OSError(errno.ENODEV, f"{name}: no back-end request channel (the front-end "
                                            "did not send SET_SLAVE_REQ_FD)")
            if self._broken is not None:
                self.failures += 1
                raise OSError(errno.EIO, f"{name}: the back-end request channel broke "
                                         f"({self._broken})")
            try:
                conn.send(encode_request(request, payload, need_reply=True), fds)
                reply = conn.recv_reply()
            except (ConnectionClosed, ProtocolError, Interrupted, OSError) as e:
                self._broken = str(e) or type(e).__name__
                self.failures += 1
                raise OSError(errno.EIO, f"{name}: {self._broken}") from None
            reply.close_fds()
            try:
                if reply.request != request:
                    raise ProtocolError(f"the ack is for {backend_request_name(reply.request)}")
                status = decode_u64(reply.payload, f"{name} ack")
            except ProtocolError as e:
                self._broken = str(e)
                self.failures += 1
                raise OSError(errno.EIO, f"{name}: {e}") from None
        if status:
            self.failures += 1
            err = status if 0 < status <= _MAX_ERRNO else errno.EIO
            raise OSError(err, f"{name} refused by the front-end: {os.strerror(err)}")


class FsMapServer:
    """The VMM's end: serves FS_MAP/FS_UNMAP from a sandboxed back-end on ``window``.

    Why mmap'ing a descriptor a jailed child sent is acceptable here: the VMM never reads or
    writes the window itself (only KVM does, for the guest), so a mapping gives the guest access
    to exactly the bytes the child could already hand it through READ and WRITE with that same
    descriptor -- with no more rights, since mmap checks the descriptor's own access mode (a
    writable mapping of a read-only descriptor fails with EACCES). What mmap of an arbitrary
    descriptor could add (device memory, a driver's mmap handler) is excluded by accepting only
    regular files (a memfd is one: guest RAM aliased into the window gives the guest nothing new).
    A file later truncated under a mapping is what the window's truncation repair already handles
    (SIGBUS cannot reach this process: it never touches the pages). Every offset, length and flag
    is checked against the window as a guest's SETUPMAPPING is, and ``window.max_files`` bounds
    the descriptors the window keeps, so a hostile child can neither map outside the window nor
    exhaust the VMM's fd table; a bad message gets an error ack, a malformed frame ends the
    channel (the child's next requests then fail), never the VMM.
    """

    def __init__(self, window, sock: socket.socket, name: str) -> None:
        self.window = window
        self.name = name
        self.conn = Connection(sock)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.conn.wake_fd = self._wake_r
        self._log = LogThrottle(logger)
        self.counters = {"fs_map": 0, "fs_unmap": 0, "refused": 0}
        self.ended: str | None = None
        self._thread = threading.Thread(target=self._serve, name=f"dax-channel:{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and close the channel. Idempotent."""
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(5)
        self.conn.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    # -- the thread ---------------------------------------------------------------------------
    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.conn.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                if any(fd == self._wake_r for fd, _ in poller.poll()):
                    self.ended = "closed"
                    return
                msg = self.conn.recv_message()
                status = self.handle(msg)
                if msg.header.need_reply:
                    self.conn.send(encode_reply(msg.request, encode_u64(status)))
        except (ConnectionClosed, Interrupted) as e:
            self.ended = str(e) or "closed"
        except ProtocolError as e:   # a frame we cannot resynchronise after: end the channel
            self.ended = str(e)
            logger.warning("virtio-fs %s: DAX channel: malformed message, channel closed: %s",
                           self.name, e)
        except OSError as e:
            self.ended = str(e)
            logger.warning("virtio-fs %s: DAX channel: %s", self.name, e)
        except Exception:  # a bug must be visible, and must not end the VMM
            self.ended = "internal error"
            logger.exception("virtio-fs %s: DAX channel: internal error", self.name)

    def handle(self, msg: Message) -> int:
        """Apply one request; returns the ack status (0 or an errno). Closes every fd."""
        try:
            if msg.request == BackendRequest.FS_MAP:
                self._fs_map(msg)
                self.counters["fs_map"] += 1
            elif msg.request == BackendRequest.FS_UNMAP:
                self._fs_unmap(msg)
                self.counters["fs_unmap"] += 1
            else:
                raise OSError(errno.EOPNOTSUPP, f"{backend_request_name(msg.request)} is not served")
            return 0
        except ProtocolError as e:
            return self._refuse(msg, errno.EINVAL, str(e))
        except OSError as e:
            return self._refuse(msg, e.errno or errno.EIO, e.strerror or str(e))
        finally:
            msg.close_fds()

    def _refuse(self, msg: Message, err: int, why: str) -> int:
        self.counters["refused"] += 1
        self._log.warn("virtio-fs %s: DAX channel: refusing %s: %s", self.name,
                       backend_request_name(msg.request), why)
        return err

    def _fs_map(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise OSError(errno.EINVAL, f"FS_MAP with {len(msg.fds)} descriptors (needs 1)")
        entries = decode_fs_backend_msg(msg.payload, "FS_MAP")
        if not entries:
            raise OSError(errno.EINVAL, "FS_MAP without a range")
        fd = msg.fds[0]
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "FS_MAP of a descriptor that is not a regular file")
        for e in entries:          # every entry checked before any is mapped
            if not e.flags & FS_FLAG_MAP_R:
                raise OSError(errno.EINVAL, f"FS_MAP flags {e.flags:#x} without MAP_R")
            self.window.check_range(e.cache_offset, e.length, "FS_MAP")
        done: list[FsMapEntry] = []
        try:
            for e in entries:
                self.window.map(e.cache_offset, fd, e.fd_offset, e.length,
                                bool(e.flags & FS_FLAG_MAP_W))
                done.append(e)
        except OSError:
            # All or nothing, as far as it goes: the entries already mapped are taken back (what
            # they replaced is not restored; our back-end sends one entry per request).
            for e in done:
                self.window.unmap(e.cache_offset, e.length)
            raise

    def _fs_unmap(self, msg: Message) -> None:
        if msg.fds:
            raise OSError(errno.EINVAL, f"FS_UNMAP with {len(msg.fds)} descriptors")
        entries = decode_fs_backend_msg(msg.payload, "FS_UNMAP")
        if any(e.length == FS_UNMAP_ALL for e in entries):
            if len(entries) != 1 or entries[0].cache_offset != 0:
                raise OSError(errno.EINVAL, "FS_UNMAP of everything must be its only entry, at 0")
            self.window.reset()
            return
        for e in entries:
            self.window.check_range(e.cache_offset, e.length, "FS_UNMAP")
        for e in entries:
            self.window.unmap(e.cache_offset, e.length)

    def metrics(self) -> dict:
        return {**self.counters, "ended": self.ended}


__all__ = ["ACK_TIMEOUT", "BackendChannel", "FsMapServer", "FS_BACKEND_ENTRIES"]
