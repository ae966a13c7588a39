"""The vhost-user socket: framing messages and passing file descriptors with SCM_RIGHTS.

A front-end writes header and payload with one sendmsg and attaches the message's descriptors to
it. We read the 12-byte header, then exactly `size` payload bytes, with recvmsg both times and keep
every descriptor that arrives on the way: the kernel never merges stream data carrying descriptors
across a recvmsg, so fds stay with the message they came with. More than MAX_FDS descriptors
(MSG_CTRUNC: the kernel already dropped the rest) is a protocol error, and descriptors are received
with MSG_CMSG_CLOEXEC so none leaks into a child process.

The socket is non-blocking and every wait goes through poll with a deadline plus an optional wake
fd: a peer that sends half a message and stalls, or stops reading our replies, costs at most
`timeout` seconds and never blocks a SIGTERM (the server's signal handler writes the wake fd).
"""

from __future__ import annotations

import array
import os
import select
import socket
import time

from .protocol import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    Header,
    Message,
    ProtocolError,
    decode_header,
    decode_reply_header,
)

_FD_SIZE = array.array("i").itemsize


class ConnectionClosed(Exception):
    """The peer closed the socket (at a message boundary, or in the middle of one)."""


class Interrupted(Exception):
    """The wake fd became readable while we waited (the server is shutting down)."""


class Connection:
    """One vhost-user stream socket. Owns the socket; `close()` closes it."""

    def __init__(self, sock: socket.socket, *, wake_fd: int = -1, timeout: float = 10.0,
                 max_payload: int = MAX_PAYLOAD_SIZE) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.wake_fd = wake_fd
        self.timeout = timeout
        self.max_payload = max_payload

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- waiting ----------------------------------------------------------------------------------
    def _wait(self, events: int, deadline: float) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if self.wake_fd >= 0:
            poller.register(self.wake_fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError(f"peer stalled for {self.timeout:g} s in the middle of a message")
            for fd, _ in poller.poll(left * 1000):
                if fd == self.wake_fd:
                    raise Interrupted()
                return

    # -- receiving --------------------------------------------------------------------------------
    def _recv_exact(self, n: int, fds: list[int], deadline: float | None, *, at_boundary: bool) -> bytes:
        """Read exactly n bytes, collecting descriptors into fds. deadline None: the first byte may
        take as long as it likes (the caller polled the socket readable)."""
        buf = bytearray()
        while len(buf) < n:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    n - len(buf), socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLIN, deadline if deadline is not None
                           else time.monotonic() + self.timeout)
                continue
            except ConnectionResetError:
                raise ConnectionClosed("connection reset by peer") from None
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[:len(cdata) - len(cdata) % _FD_SIZE])
                    fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors on one message")
            if len(fds) > MAX_FDS:
                raise ProtocolError(f"{len(fds)} file descriptors on one message (at most {MAX_FDS})")
            if not data:
                if at_boundary and not buf:
                    raise ConnectionClosed("peer closed the connection")
                raise ConnectionClosed(f"peer closed the connection in the middle of a message "
                                       f"({len(buf)} of {n} bytes)")
            buf += data
            at_boundary = False
            if deadline is None:
                deadline = time.monotonic() + self.timeout
        return bytes(buf)

    def _recv(self, decode) -> tuple[Header, bytes, list[int]]:
        fds: list[int] = []
        try:
            raw = self._recv_exact(HEADER_SIZE, fds, None, at_boundary=True)
            hdr = decode(raw, max_payload=self.max_payload)
            payload = self._recv_exact(hdr.size, fds, time.monotonic() + self.timeout,
                                       at_boundary=False) if hdr.size else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return hdr, payload, fds

    def recv_message(self) -> Message:
        """The next request (back-end side). Raises ConnectionClosed, ProtocolError, Interrupted."""
        hdr, payload, fds = self._recv(decode_header)
        return Message(hdr, payload, fds)

    def recv_reply(self) -> Message:
        """The next reply (front-end side: tests and a front-end)."""
        hdr, payload, fds = self._recv(decode_reply_header)
        return Message(hdr, payload, fds)

    # -- sending ----------------------------------------------------------------------------------
    def send(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        """Send one whole message; descriptors ride on its first byte."""
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                n = self.sock.sendmsg([view], anc, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLOUT, deadline)
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise ConnectionClosed("peer closed the connection") from None
            view = view[n:]
            anc = []
