"""Serving threads for one /dev/fuse connection: read a request, ``Server.handle``, write the reply.

Each thread owns a request buffer and a reply buffer.  The fd is non-blocking and each thread
waits in poll(2) on it and on a stop eventfd, so ``stop()`` never waits for the kernel to send
something.  What the kernel's device says (``fs/fuse/dev.c``):

* read: ``EAGAIN`` another thread took the request; ``ENOENT`` the request was interrupted
  before we read it; ``ENODEV`` the connection is gone (unmounted, or aborted through fusectl):
  the session ends; ``EINVAL`` our buffer is smaller than the kernel's minimum (a bug here).
* write: ``ENOENT`` the request was interrupted or aborted meanwhile, so nobody wants the reply;
  ``ENODEV`` the connection is gone; ``EINVAL`` a malformed reply (a server bug, logged).

FORGET, BATCH_FORGET and INTERRUPT get no reply: the server writes nothing for them, and nothing
is sent.  Every other request is answered, if need be with EIO from here: a request the server
could not answer would otherwise leave its caller waiting until the connection is aborted.  Several
threads may serve one connection; ``fuse.Server.handle`` is thread-safe.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from dataclasses import asdict, dataclass, field

from fuse import abi
from fuse.logthrottle import LogThrottle

from .buffers import ReplyBuffer, RequestBuffer

logger = logging.getLogger(__name__)

#: The kernel refuses reads into anything smaller (FUSE_MIN_READ_BUFFER in fs/fuse/fuse_i.h).
FUSE_MIN_READ_BUFFER = 8192
IN_HEADER_SIZE = abi.IN_HEADER.size
OUT_HEADER_SIZE = abi.OUT_HEADER.size
#: Largest reply payload apart from READ/READDIR (bounded by max_write): a 64 KiB xattr value or
#: list (XATTR_SIZE_MAX / XATTR_LIST_MAX).
MAX_XATTR_REPLY = 65536


@dataclass
class FuseDevCounters:
    """Transport counters (each thread updates them under the session's lock)."""

    requests: int = 0          # requests read from /dev/fuse
    replies: int = 0           # replies written
    no_reply: int = 0          # requests answered with nothing (FORGET, INTERRUPT, dropped)
    replies_unwanted: int = 0  # replies the kernel refused with ENOENT (request interrupted)
    interrupted_reads: int = 0  # reads answered ENOENT (request interrupted before we read it)
    errors: int = 0            # other read/write/handler failures (logged once per kind)

    def snapshot(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


@dataclass
class _Thread:
    thread: threading.Thread
    request: RequestBuffer = field(repr=False)
    reply: ReplyBuffer = field(repr=False)


class FuseSession:
    """Serve ``fd`` (an open, mounted /dev/fuse) with ``server`` on ``threads`` threads."""

    def __init__(self, fd: int, server, *, threads: int = 1, name: str = "fuse") -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.fd = fd
        self.server = server
        self.name = name
        self.counters = FuseDevCounters()
        self._count_lock = threading.Lock()
        self._log = LogThrottle(logger)
        self._stopping = False
        self._disconnected = threading.Event()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        request_size = max(FUSE_MIN_READ_BUFFER, server.max_request)
        reply_size = OUT_HEADER_SIZE + max(server.max_write, MAX_XATTR_REPLY)
        self._threads = [
            _Thread(threading.Thread(target=self._run, args=(i,), name=f"{name}:{i}",
                                     daemon=True),
                    RequestBuffer(request_size), ReplyBuffer(reply_size))
            for i in range(threads)
        ]

    @property
    def disconnected(self) -> bool:
        """True once the kernel said the connection is gone (ENODEV)."""
        return self._disconnected.is_set()

    def start(self) -> None:
        for t in self._threads:
            t.thread.start()

    def wait_disconnected(self, timeout: float | None = None) -> bool:
        return self._disconnected.wait(timeout)

    def stop_requested(self) -> bool:
        """Each request's ``should_stop``: a long one ends early once stop() was called."""
        return self._stopping

    def alive(self) -> bool:
        return any(t.thread.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving after the requests in progress; True if every thread ended in time."""
        self._stopping = True
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        ok = True
        for t in self._threads:
            if t.thread.is_alive() and t.thread is not threading.current_thread():
                t.thread.join(timeout)
                ok = ok and not t.thread.is_alive()
        if ok and self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        return ok

    # -- threads -----------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)

    def _run(self, index: int) -> None:
        me = self._threads[index]
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            while not self._stopping:
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_fd in ready or self._stopping:
                    return
                if not self._serve_one(index, me):
                    return
        except Exception:  # a bug here must be visible, but the other threads keep serving
            logger.exception("%s: serving thread %d stopped by an internal error", self.name,
                             index)

    def _serve_one(self, index: int, me: _Thread) -> bool:
        """Read and answer at most one request; False when the connection is gone."""
        try:
            n = os.readv(self.fd, [me.request.buf])
        except BlockingIOError:
            return True                      # another thread took it
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._count("interrupted_reads")
                return True
            if e.errno == errno.ENODEV:
                self._disconnected.set()
                return False
            self._count("errors")
            self._log.once(f"read:{e.errno}", logging.ERROR, "%s: read from /dev/fuse failed: %s; stopping this "
                           "thread", self.name, e)
            return False
        if n == 0:                           # not expected from /dev/fuse; treat as gone
            self._disconnected.set()
            return False
        self._count("requests")
        me.request.load(n)
        me.reply.clear()
        try:
            written = self.server.handle(me.request, me.reply, queue=index,
                                         should_stop=self.stop_requested)
        except Exception as e:  # noqa: BLE001 - handle() should never raise; never die for it
            self._count("errors")
            self._log.once(f"handler:{type(e).__name__}", logging.ERROR, "%s: request failed (%s: %s); replying "
                           "EIO", self.name, type(e).__name__, e)
            return self._send_error(me, errno.EIO) if self._needs_reply(me.request, n) else True
        if not written:
            if self._needs_reply(me.request, n):
                # The server could not answer (it logged why); the caller must not hang.
                self._count("errors")
                return self._send_error(me, errno.EIO)
            self._count("no_reply")
            return True
        try:
            os.write(self.fd, me.reply.reply(written))
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._count("replies_unwanted")
                return True
            if e.errno == errno.ENODEV:
                self._disconnected.set()
                return False
            self._count("errors")
            self._log.once(f"write:{e.errno}", logging.ERROR, "%s: the kernel refused a reply of %d bytes (%s); "
                           "replying EIO", self.name, written, e)
            # A reply refused for its form (EINVAL) leaves the request pending in the kernel.
            return self._send_error(me, errno.EIO)
        self._count("replies")
        return True

    @staticmethod
    def _needs_reply(request: RequestBuffer, length: int) -> bool:
        """Does the request just read wait for a reply?  Every opcode does except FORGET,
        BATCH_FORGET, INTERRUPT (and NOTIFY_REPLY, which the kernel never sends us)."""
        if length < IN_HEADER_SIZE:
            return False
        opcode = int.from_bytes(request.buf[4:8], "little")
        return opcode not in abi.NO_REPLY_OPCODES

    def _send_error(self, me: _Thread, err: int) -> bool:
        unique = int.from_bytes(me.request.buf[8:16], "little")
        try:
            os.write(self.fd, abi.OUT_HEADER.struct.pack(OUT_HEADER_SIZE, -err, unique))
        except OSError as e:
            if e.errno == errno.ENODEV:
                self._disconnected.set()
                return False
            if e.errno != errno.ENOENT:
                self._log.once(f"write-error:{e.errno}", logging.ERROR, "%s: could not send an error reply: %s",
                               self.name, e)
            return True
        self._count("replies")
        return True
