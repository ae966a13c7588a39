"""The vhost-user back-end process's main loop: listen, serve one front-end at a time, survive it.

The back-end listens on a Unix socket (QEMU's `-chardev socket,path=...` connects to it, as it
does to virtiofsd) and serves one connection at a time on the calling thread: it polls the
connection, the wake pipe (SIGTERM, SIGINT, the control socket's "stop") and, while the device is
not started yet, the kick fds of ready rings (start-on-kick, see backend.py). The device's own
worker thread serves the rings; this thread only handles control messages.

A front-end that goes away (QEMU killed: EOF or ECONNRESET) or that we disconnect (a malformed
message) ends only its session: the device is reset, every fd and mapping of the session is
released, and the server waits for the next front-end -- or returns, with `once`. An unexpected
exception in the session is logged with its traceback and handled the same way, so no message can
take the process down.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import time

from devices.virtio.device import VirtioDevice

from .backend import BackendCounters, CloseConnection, VhostUserBackend, thread_cpu_seconds
from .connection import Connection, ConnectionClosed, Interrupted
from .protocol import ProtocolError

logger = logging.getLogger(__name__)


class SocketInUse(OSError):
    """Another process is listening on the socket path (or the path is not a socket)."""


def _prepare_path(path: str) -> None:
    """Remove a stale socket left by a dead back-end; refuse a live one or a non-socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise SocketInUse(f"{path} is in use by another process")


class BackendServer:
    """A listening vhost-user socket serving `device`; `serve()` runs until stopped.

    With `path=None` nothing listens and `serve_connection(sock)` serves an already-connected
    socket (a socketpair in tests, or an inherited fd).
    """

    def __init__(self, device: VirtioDevice, path: str | None, *, once: bool = False,
                 timeout: float = 10.0, backend_channel=None) -> None:
        self.device = device
        self.backend_channel = backend_channel   # DAX: see VhostUserBackend
        self.path = path
        self.once = once
        self.timeout = timeout
        self.counters = BackendCounters()
        self.backend: VhostUserBackend | None = None  # the current session, if any
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.listener: socket.socket | None = None
        self._closed = False
        if path is None:
            return
        try:
            _prepare_path(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                self.listener.bind(path)
                self.listener.listen(1)
            except BaseException:
                self.listener.close()
                raise
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise

    # -- control ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Make serve() return soon (safe from a signal handler or another thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    @property
    def stopping(self) -> bool:
        return self._stopping

    def metrics(self) -> dict:
        """The device's counters plus the vhost-user control plane's and the host CPU spent."""
        m = dict(self.device.metrics())
        vu = self.counters.snapshot()
        backend = self.backend
        vu["active"] = bool(backend and backend.active)
        vu["call_signals"] += backend.interrupt.signals if backend else 0
        m["vhost_user"] = vu
        times = os.times()
        worker = getattr(self.device, "worker_thread", None)
        live = thread_cpu_seconds(worker.native_id if worker is not None else None) or 0.0
        m["host_cpu"] = {
            "process_s": times.user + times.system,  # every thread of this process
            "worker_threads_s": self.counters.worker_cpu_s + live,  # the device's queue workers
        }
        return m

    def reset_metrics(self) -> None:
        reset = getattr(self.device, "reset_metrics", None)
        if reset is not None:
            reset()
        self.counters.reset()

    # -- serving ----------------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve front-ends one after another until stopped (or after one, with `once`)."""
        while not self._stopping:
            sock = self._accept()
            if sock is None:
                return
            self.counters.connections += 1
            self._session(sock)
            if self.once:
                return

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve one already-connected front-end until it goes away (or we are stopped)."""
        self.counters.connections += 1
        self._session(sock)

    def _accept(self) -> socket.socket | None:
        assert self.listener is not None, "no listening socket (path=None)"
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    return None
                try:
                    sock, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                logger.info("vhost-user: front-end connected on %s", self.path)
                return sock
        return None

    def _session(self, sock: socket.socket) -> None:
        conn = Connection(sock, wake_fd=self._wake_r, timeout=self.timeout)
        backend = VhostUserBackend(self.device, self.counters, self.backend_channel)
        self.backend = backend
        started = time.monotonic()
        try:
            self._loop(conn, backend)
        except ConnectionClosed as e:
            logger.info("vhost-user: front-end disconnected (%s)", e)
        except CloseConnection as e:
            logger.warning("vhost-user: closing the connection: %s", e)
        except ProtocolError as e:
            self.counters.closed_by_backend += 1
            logger.warning("vhost-user: closing the connection on a malformed message: %s", e)
        except Interrupted:
            logger.info("vhost-user: stopping")
        except Exception:  # a bug must be visible, but must not end the process
            self.counters.closed_by_backend += 1
            logger.exception("vhost-user: internal error; closing the connection")
        finally:
            self.backend = None
            self.counters.call_signals += backend.interrupt.signals
            try:
                backend.close()
            except Exception:
                logger.exception("vhost-user: error while ending the session")
            conn.close()
            logger.info("vhost-user: session ended after %.1f s", time.monotonic() - started)

    def _loop(self, conn: Connection, backend: VhostUserBackend) -> None:
        sock_fd = conn.fileno()
        while not self._stopping:
            kicks = backend.watched_kicks()
            poller = select.poll()
            poller.register(sock_fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            for fd in kicks:
                poller.register(fd, select.POLLIN)
            events = poller.poll()
            fds = {fd for fd, _ in events}
            if self._wake_r in fds:
                return
            if sock_fd in fds:
                reply = backend.handle(conn.recv_message())
                if reply is not None:
                    conn.send(reply)
            elif fds & set(kicks):
                backend.kicked()

    def close(self) -> None:
        """Stop listening and remove the socket path. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.path)  # type: ignore[arg-type]
            except FileNotFoundError:
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> BackendServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
