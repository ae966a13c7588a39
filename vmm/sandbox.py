"""A `type: fs` device with `sandbox: namespace|chroot` (the default): the device runs in a jailed
child process, as crosvm runs each device.

The VMM makes two socketpairs per device and execs ``python -m vmm device fs --fd N --stats-fd M
--options-json ... --sandbox MODE`` (a fresh interpreter: no fork of a process with threads; the
child is started while the VM is assembled, before any vCPU runs). The child jails itself
(devices/jail: pivot_root into the share, reduced capabilities, no_new_privs, seccomp) and serves
the vhost-user socket N. This process then is the vhost-user *front-end* of the ordinary path
(devices/virtio/vhost_user/frontend.py) on that socket: guest RAM is a memfd the child maps, the
rings' kick eventfds are KVM ioeventfds and the call eventfd is the irqfd, so a request never
passes through the VMM, which keeps only the MMIO registers.

Socket M is the stats channel (device_backend.StatsResponder is the other end). While the child
starts it carries lines: ``pid N`` (from the jail's relay: the jailed process as seen from here),
then ``ready`` once the jail is in place, or ``error ...``; after that, length-prefixed JSON
frames: ``{"cmd": "stats"}`` -> the counters of the in-process device plus the back-end's
(``vhost_user``, ``host_cpu``), ``{"cmd": "reset"}``. So `--metrics`, `ctl stats` and the test
plugin see the same ``fs:TAG`` numbers as with `sandbox: none`.

With ``dax: true`` this process keeps the DAX window (memory slot, SHM registers, truncation
repair) and the child maps files into it over the vhost-user back-end request channel
(FS_MAP/FS_UNMAP, devices/virtio/vhost_user/backend_req.py); the window's size is the share's
``dax_window_mib``, which the child learns from the same ``--options-json``.

A child that dies is noticed by the front-end's monitor (the socket hangs up): the device is
marked DEVICE_NEEDS_RESET and the run ends with one line giving the child's exit status.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from devices.memory import GuestMemory
from devices.virtio.fs.device import default_trace_path
from devices.virtio.fs.options import FsOptions
from devices.virtio.vhost_user.frontend import (
    VhostUserFrontendError,
    VhostUserFsFrontend,
    VhostUserFsOptions,
)

from .device_backend import FRAME, send_frame

logger = logging.getLogger(__name__)

#: How long the child may take to start and jail itself (an interpreter start on a loaded host).
START_TIMEOUT_S = 60.0
#: How long a stats request may take.
STATS_TIMEOUT_S = 10.0
#: How long the child gets to end its session and exit once the VM hangs up.
EXIT_TIMEOUT_S = 5.0
#: The largest stats reply accepted (lookups_by_name is bounded by the device's own limits).
MAX_STATS_REPLY = 64 << 20
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SandboxError(VhostUserFrontendError):
    """The sandboxed child could not be started (the text says why, in one line); a kind of
    VhostUserFrontendError, so the VMM reports it the same way (vmm/errors.py)."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.socket_path = ""


def describe_status(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class BackendChild:
    """The jailed back-end process of one share: its Popen, the jailed pid, the stats channel."""

    def __init__(self, options: FsOptions) -> None:
        self.options = options
        self.tag = options.tag
        vhost_parent, vhost_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stats_parent, stats_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.vhost_sock: socket.socket | None = vhost_parent
        self.stats_sock = stats_parent
        self._lock = threading.Lock()
        if options.trace and options.trace_path is None:
            # The default trace path names this process (the VMM), as it does in-process.
            options = dataclasses.replace(options, trace_path=default_trace_path(options.tag))
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        level = logger.getEffectiveLevel()          # the VMM's -v/-vv, passed on
        verbosity = ["-vv"] if level <= logging.DEBUG else ["-v"] if level <= logging.INFO else []
        cmd = [sys.executable, "-m", "vmm", *verbosity, "device", "fs",
               "--fd", str(vhost_child.fileno()), "--stats-fd", str(stats_child.fileno()),
               "--options-json", json.dumps(fields), "--sandbox", options.sandbox]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH"))
                                            if p)
        try:
            # start_new_session: a Ctrl-C at the terminal stops the VMM, which then ends the
            # child's session itself (the child must not die first and look like a crash).
            self.proc = subprocess.Popen(cmd, pass_fds=(vhost_child.fileno(), stats_child.fileno()),
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as exc:
            vhost_parent.close()
            stats_parent.close()
            raise SandboxError(f"sandboxed fs device {self.tag!r}: cannot start the back-end: "
                               f"{exc}") from None
        finally:
            vhost_child.close()
            stats_child.close()
        self.pid = self.proc.pid
        self.jailed_pid = self.pid
        try:
            self._handshake()
        except BaseException:
            self.kill()
            self.close()
            raise

    def _handshake(self) -> None:
        """Read the setup lines up to ``ready`` (bounded: a wedged start cannot hang the VMM)."""
        buf = b""
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"ready\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stats_sock], [], [], left)[0]:
                raise SandboxError(f"sandboxed fs device {self.tag!r}: the back-end did not "
                                   f"start within {START_TIMEOUT_S:g} s")
            chunk = self.stats_sock.recv(4096)
            if not chunk:
                code = self.wait(2.0)
                errors = [ln[6:] for ln in buf.decode(errors="replace").splitlines()
                          if ln.startswith("error ")]
                raise SandboxError(f"sandboxed fs device {self.tag!r}: the back-end "
                                   f"{describe_status(code)} before serving"
                                   + (f": {errors[0]}" if errors else ""))
            buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("pid "):
                self.jailed_pid = int(line[4:])

    # -- stats ------------------------------------------------------------------------------------
    def request(self, cmd: str) -> dict:
        """One stats-channel exchange; raises OSError when the child is gone or too slow."""
        with self._lock:
            self.stats_sock.settimeout(STATS_TIMEOUT_S)
            send_frame(self.stats_sock, json.dumps({"cmd": cmd}).encode())
            head = self._recv_exact(FRAME.size)
            (n,) = FRAME.unpack(head)
            if n > MAX_STATS_REPLY:
                raise OSError(f"stats reply of {n} bytes")
            reply = json.loads(self._recv_exact(n))
        if not reply.get("ok"):
            raise OSError(f"the back-end refused {cmd!r}: {reply.get('error')}")
        return reply

    def _recv_exact(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = self.stats_sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise OSError("the back-end closed its stats channel")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    # -- lifetime ---------------------------------------------------------------------------------
    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the relay (the jailed process follows: its parent-death signal)."""
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> int | None:
        """Wait for the child to end (the vhost-user connection is already closed), killing it
        after EXIT_TIMEOUT_S; returns its exit code. Idempotent."""
        if self.vhost_sock is not None:
            self.vhost_sock.close()
            self.vhost_sock = None
        code = self.wait(EXIT_TIMEOUT_S)
        if code is None:
            logger.warning("sandboxed fs device %s: the back-end (pid %d) did not exit within "
                           "%.0f s; killing it", self.tag, self.pid, EXIT_TIMEOUT_S)
            self.kill()
            code = self.wait(EXIT_TIMEOUT_S)
        self.stats_sock.close()
        return code


class SandboxedFsDevice(VhostUserFsFrontend):
    """The VMM's side of a sandboxed `type: fs` device: a vhost-user front-end whose back-end is
    the jailed child it started. ``metrics()`` are the child's counters (same keys as the
    in-process FsDevice's) plus the front-end's and a ``sandbox`` entry."""

    def __init__(self, options: FsOptions, memory: GuestMemory, *,
                 on_lost: Callable[[str], None] | None = None) -> None:
        if not memory.shareable:
            raise SandboxError(f"sandboxed fs device {options.tag!r}: guest RAM is not a memfd")
        self.fs_options = options
        self.child = BackendChild(options)
        self._on_lost_outer = on_lost
        assert self.child.vhost_sock is not None
        window = options.dax_window_mib << 20 if options.dax else 0
        try:
            super().__init__(VhostUserFsOptions(
                socket=f"<sandboxed child pid {self.child.pid}>", tag=options.tag,
                num_request_queues=options.num_request_queues), memory,
                on_lost=self._child_lost, sock=self.child.vhost_sock,
                # a Linux guest maps 2 MiB chunks: never more files than chunks, nor inodes
                dax_window_size=window, dax_max_files=min(options.max_inodes, window >> 21) or None)
        except VhostUserFrontendError:
            self.child.kill()
            self.child.close()
            raise
        self.child.vhost_sock = None           # the front-end's Connection owns it now
        logger.info("virtio-fs %s: served by a sandboxed child (pid %d, jailed pid %d, %s)",
                    options.tag, self.child.pid, self.child.jailed_pid, options.sandbox)

    def _child_lost(self, message: str) -> None:
        code = self.child.wait(1.0)
        line = (f"sandboxed fs device {self.fs_options.tag!r}: the back-end child (pid "
                f"{self.child.jailed_pid}) {describe_status(code)} while the VM was running; "
                "the device needs a reset")
        if self._on_lost_outer is not None:
            self._on_lost_outer(line)
        else:
            logger.error("%s", line)

    def metrics(self) -> dict:
        try:
            m = dict(self.child.request("stats")["metrics"])
        except (OSError, ValueError) as exc:
            m = {"error": f"no counters from the sandboxed child: {exc}"}
        m.update(super().metrics())
        m["sandbox"] = {"mode": self.fs_options.sandbox, "pid": self.child.jailed_pid,
                        "relay_pid": self.child.pid}
        return m

    def reset_metrics(self) -> None:
        super().reset_metrics()
        try:
            self.child.request("reset")
        except (OSError, ValueError) as exc:
            logger.warning("sandboxed fs device %s: reset of the counters: %s",
                           self.fs_options.tag, exc)

    def close(self) -> None:
        if self._closing:
            return
        super().close()                     # stops the rings and hangs up: the child's session ends
        code = self.child.close()
        if code not in (0, None):
            logger.warning("sandboxed fs device %s: the back-end child %s",
                           self.fs_options.tag, describe_status(code))
