"""The control socket: a Unix stream socket taking one JSON request per line.

Requests are `{"cmd": "stats"}`, `{"cmd": "reset"}` or `{"cmd": "stop"}` (a bare JSON string such as
`"stats"` works too); each gets one JSON line back. Tests and benchmarks use it to read and zero the
device counters between phases of a running guest, and `python -m vmm ctl` is a small client.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
from typing import Any

logger = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024


class ControlServer:
    """Serves requests on a background thread until closed. Context manager."""

    def __init__(self, path: str, machine: Any):
        self.path = path
        self.machine = machine
        if os.path.exists(path):
            if not _is_stale_socket(path):
                raise OSError(f"control socket {path} is in use by another VMM")
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.listen(4)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def __enter__(self) -> ControlServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(2)
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock.fileno(), self._stop_r], [], [])
            if self._stop_r in ready:
                return
            conn, _ = self.sock.accept()
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buf = b""
        while True:
            try:
                chunk = conn.recv(4096)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            buf += chunk
            if len(buf) > MAX_REQUEST:
                self._reply(conn, {"ok": False, "error": "request too long"})
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self._reply(conn, self.handle(line))

    @staticmethod
    def _reply(conn: socket.socket, obj: dict) -> None:
        try:
            conn.sendall(json.dumps(obj).encode() + b"\n")
        except OSError:
            pass

    def handle(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        cmd = request.get("cmd") if isinstance(request, dict) else request
        if cmd == "stats":
            return {"ok": True, "devices": self.machine.device_metrics()}
        if cmd == "reset":
            self.machine.reset_metrics()
            return {"ok": True}
        if cmd == "stop":
            from .vcpu import Stop, StopReason
            self.machine.request_stop(Stop(StopReason.CONTROL))
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r} (known: stats, reset, stop)"}


def _is_stale_socket(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        return True
    finally:
        s.close()
    return False


def request(path: str, cmd: str, timeout: float = 5.0) -> dict:
    """Client side: send one command, return the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)
