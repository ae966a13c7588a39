"""`python -m vmm device fs`: the virtio-fs device as a standalone vhost-user back-end process.

Like crosvm's `crosvm device fs` and C virtiofsd, it serves one shared directory to a VMM that
speaks vhost-user (QEMU's `-device vhost-user-fs-device`): the share is given exactly as for
`run` (`--shared-dir PATH:TAG[:key=value...]`, parsed by the same code, or `--config FILE` with
one `type: fs` device), and the same `--metrics FILE` and `--control PATH` report the device's
counters (plus the back-end's vhost-user counters and its host CPU time).

The process follows the vhost-user "back-end program conventions": it does not daemonize, it
ends quickly and cleanly on SIGTERM (and SIGINT) with status 0, and it outlives its front-end:
when QEMU goes away the session is torn down and the socket accepts the next front-end, unless
`--once` asks to exit after the first session.

`--sandbox namespace|chroot|none` (default: the share's `sandbox` option, itself `namespace`): the
process jails itself with `devices.jail.enter` once the front-end's connection is in hand and
before it serves a single message: pivot_root (or chroot) into the share, only the capabilities
the passthrough needs, no_new_privs, the seccomp allowlist of devices/jail/policy.py. A jailed
back-end opens no new channel (socket, bind, accept are outside the policy), so it serves exactly
one front-end: the one it accepted on `--socket` before the jail, or the already-connected socket
it inherited as `--fd N` (how the VMM starts it for a `type: fs` device, see vmm/sandbox.py), and
`--control` needs `--sandbox none`. A share with `dax: true` never maps files into a window of
this process: its DAX window's mapper is the vhost-user back-end request channel (FS_MAP/FS_UNMAP
to the front-end, which owns the window; devices/virtio/vhost_user/backend_req.py), connected
when the front-end sends SET_SLAVE_REQ_FD. With `uidmap`/`gidmap` the jail is also a user
namespace with those maps (`idmap`, devices/virtio/fs/idmap.py), where the kernel translates the
ids and the device holds only the mapped host ids; where that cannot be, the device translates
and one log line says why. `--stats-fd N` (a socket inherited from the VMM) answers the
VMM's requests for the counters; see vmm/sandbox.py for its small protocol.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from devices.virtio.fs.options import FsOptions

from .config import ConfigError, load_config, parse_shared_dir
from .errors import EXIT_FAILURE

logger = logging.getLogger(__name__)


class _ControlTarget:
    """What vmm.control.ControlServer needs from a "machine": stats, reset, stop."""

    def __init__(self, server: Any, tag: str) -> None:
        self.server = server
        self.tag = tag

    def device_metrics(self) -> dict:
        return {f"fs:{self.tag}": self.server.metrics()}

    def reset_metrics(self) -> None:
        self.server.reset_metrics()

    def request_stop(self, _stop: object = None) -> None:
        self.server.request_stop()


def fs_options(shared_dir: str | None, config: Path | None, options_json: str | None = None):
    """The one share to serve, from --shared-dir, a config file's single fs device, or
    --options-json (every FsOptions field, as the VMM hands a share to its sandboxed child)."""
    if shared_dir is not None:
        return parse_shared_dir(shared_dir)
    if options_json is not None:
        try:
            return FsOptions(**json.loads(options_json))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--options-json: {exc}") from None
    assert config is not None
    cfg = load_config(config)
    if len(cfg.devices) != 1 or not isinstance(cfg.devices[0], FsOptions):
        raise ConfigError(f"{config}: devices: a back-end serves exactly one `type: fs` device, "
                          f"found {len(cfg.devices)} device(s)")
    return cfg.devices[0]


def run_fs_backend(socket_path: str | None, *, shared_dir: str | None = None,
                   config: Path | None = None, options_json: str | None = None,
                   fd: int | None = None, stats_fd: int | None = None, sandbox: str | None = None,
                   once: bool = False, metrics: Path | None = None, control: str | None = None,
                   progress=lambda msg: print(f"pyvmm: {msg}", file=sys.stderr, flush=True)) -> int:
    from devices.virtio.fs.device import FsDevice
    from devices.virtio.vhost_user.server import BackendServer, SocketInUse

    if stats_fd is not None:   # the VMM's child: its start-up line is for -v, not for every run
        progress = logger.info
    try:
        options = fs_options(shared_dir, config, options_json)
    except ConfigError as exc:
        _report(stats_fd, exc)
        raise
    if (socket_path is None) == (fd is None):
        raise ConfigError("device fs: give exactly one of --socket PATH and --fd N")
    mode = sandbox or options.sandbox
    if mode != options.sandbox:
        # The device's own choices follow where it really runs (idmap: a user namespace only
        # in a jail).
        try:
            options = dataclasses.replace(options, sandbox=mode)
        except ValueError as exc:
            raise ConfigError(f"--sandbox {mode}: {exc}") from None
    if mode != "none":
        if control:
            raise ConfigError("--control needs --sandbox none: a jailed back-end opens no socket "
                              "(read its counters with --metrics, or from the VMM)")
        _exit_jailed(_run_jailed(options, mode, socket_path, fd, stats_fd, metrics, progress))
    channel = dax_channel(options)
    device = FsDevice(options, dax_mapper=channel)
    if fd is not None:
        return _serve_fd(device, fd, stats_fd, metrics, progress, channel)
    server: BackendServer | None = None
    stop_early = False

    def on_signal(signum, _frame) -> None:
        nonlocal stop_early
        stop_early = True
        if server is not None:
            server.request_stop()

    # Installed before the socket exists, so a SIGTERM that comes as soon as a supervisor sees
    # the socket is never met by the default action.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server = BackendServer(device, socket_path, once=once, backend_channel=channel)
        except (SocketInUse, OSError) as exc:
            progress(f"error: cannot listen on {socket_path}: {exc}")
            return EXIT_FAILURE
        with server:
            target = _ControlTarget(server, options.tag)
            ctl = None
            if control:
                from .control import ControlServer
                ctl = ControlServer(control, target).__enter__()
            try:
                progress(f"vhost-user-fs back-end: {options.source} as tag {options.tag!r} on {socket_path}")
                if stop_early:
                    server.request_stop()
                server.serve()
            finally:
                if ctl is not None:
                    ctl.close()
            if metrics is not None:
                metrics.write_text(json.dumps({"exit_status": 0, "devices": target.device_metrics()},
                                              indent=2, sort_keys=True) + "\n")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        device.close()
    return 0


def dax_channel(options: FsOptions):
    """The DAX window's mapper of a back-end process: the back-end request channel (or None)."""
    if not options.dax:
        return None
    from devices.virtio.vhost_user.backend_req import BackendChannel
    return BackendChannel()


# ---------------------------------------------------------------------------------- jailed / --fd


def _accept_one(path: str) -> socket.socket:
    """Listen on `path` and take one front-end: a jailed back-end cannot accept later."""
    from devices.virtio.vhost_user.server import _prepare_path

    _prepare_path(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
        listener.bind(path)
        try:
            listener.listen(1)
            sock, _ = listener.accept()
        finally:
            os.unlink(path)            # the jail could not remove it later
    return sock


def _run_jailed(options: FsOptions, mode: str, socket_path: str | None, fd: int | None,
                stats_fd: int | None, metrics: Path | None, progress) -> int:
    """Take the connection, open what must come from the host tree, jail, then serve."""
    # Everything the jailed code runs is imported now: after pivot_root the interpreter's
    # files are out of reach.
    from devices.jail import JailSpec, UserNamespaceUnavailable, enter
    from devices.virtio.fs import idmap, inodes
    from devices.virtio.fs.device import FsDevice, default_trace_path
    from devices.virtio.fs.fdbudget import HEADROOM
    from devices.virtio.vhost_user.server import BackendServer  # noqa: F401 - for _serve_fd
    from devices.virtio.vhost_user import backend_req  # noqa: F401 - DAX channel
    # imported lazily by FsDevice / the worker: load them while they are reachable
    import ctypes  # noqa: F401
    import devices.virtio.fs.passthrough  # noqa: F401
    import fuse.server  # noqa: F401

    if fd is None:
        assert socket_path is not None
        progress(f"vhost-user-fs back-end: waiting for one front-end on {socket_path} "
                 f"(sandbox {mode})")
        sock = _accept_one(socket_path)
    else:
        sock = socket.socket(fileno=fd)
    keep = [sock.fileno()]
    metrics_fd = trace_fd = None
    if metrics is not None:
        metrics_fd = os.open(metrics, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        keep.append(metrics_fd)
    if options.trace:   # the trace file lives in the host tree: opened now, reopened by fd
        trace_fd = os.open(options.trace_path or default_trace_path(options.tag),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        keep.append(trace_fd)
    if stats_fd is not None:
        keep.append(stats_fd)
    where, why = idmap.plan(options)
    if where == "userns":
        logger.info("virtio-fs %s: uidmap/gidmap applied by a user namespace around the device",
                    options.tag)
    elif where == "device":
        # a warning when `auto` had to fall back; asked for explicitly, it is only information
        _say_device_translates(options, why)
    userns = where == "userns"
    try:
        spec = JailSpec(root=options.source, mode=mode, allow_mknod=options.allow_mknod,
                        uid_map=idmap.kernel_ranges(options.uidmap) if userns else None,
                        gid_map=idmap.kernel_ranges(options.gidmap) if userns else None,
                        # file capabilities reach the host only with xattr_policy passthrough
                        allow_setfcap=options.xattr_policy == "passthrough",
                        max_open_files=min(1 << 20, options.max_inodes + options.max_handles + HEADROOM),
                        keep_fds=tuple(keep))
        try:
            jail = enter(spec, report_fd=stats_fd)
        except UserNamespaceUnavailable as exc:
            if options.idmap != "auto":
                raise
            # `auto` promised the maps, not the namespace: the device translates them instead
            _say_device_translates(options, exc)
            spec = dataclasses.replace(spec, uid_map=None, gid_map=None)
            jail = enter(spec, report_fd=stats_fd)
    except Exception as exc:  # noqa: BLE001 - e.g. no privilege for namespaces: say why, once
        _report(stats_fd, exc)
        raise
    inodes.set_proc_root(jail.proc_root)
    idmap.set_kernel_translates(jail.spec.userns)
    if jail.spec.userns:
        root_st = os.stat("/")
        if root_st.st_uid != 0:
            # The namespace's 0 (the device) is not the share's owner: what the guest's root may
            # do at the top of the share is what the "other" bits allow (the kernel decides).
            logger.warning("virtio-fs %s: the shared directory does not belong to the host uid "
                           "the namespace's 0 maps to (it shows as uid %d inside): the guest's "
                           "root gets only its group/other permissions there",
                           options.tag, root_st.st_uid)
    changes: dict[str, Any] = {}
    if mode != "none":
        changes["source"] = "/"
    if trace_fd is not None:
        changes["trace_path"] = f"{jail.proc_root}self/fd/{trace_fd}"
    channel = dax_channel(options)
    try:
        device = FsDevice(dataclasses.replace(options, **changes), dax_mapper=channel)
    except Exception as exc:  # noqa: BLE001 - reported to the VMM; nothing can be imported now
        logger.exception("sandboxed back-end: the device cannot start")
        _report(stats_fd, exc)
        return EXIT_FAILURE
    code = _serve_fd(device, sock.detach(), stats_fd, metrics_fd, progress, channel)
    if trace_fd is not None:
        os.close(trace_fd)
    return code


def _exit_jailed(code: int) -> NoReturn:
    """End the jailed back-end without finalizing the interpreter.

    Its daemon threads (the stats channel, idle pool threads) are still blocked in system calls
    when the session ends, and CPython's finalization around them inside the jail crashed the
    child now and then: about one exit in ten under load ended in SIGABRT, then SIGSEGV, in C
    code with no Python frame (tests/test_sandbox.py, with PYTHONFAULTHANDLER=1). Everything the
    process owes anyone is written by now (replies, the metrics file, the trace, which
    `device.close()` closed), so flush the log and the standard streams and leave."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _say_device_translates(options: FsOptions, why: object) -> None:
    """The one log line saying the device, not a user namespace, applies uidmap/gidmap: a
    warning where `idmap: auto` had to fall back, information where `device` was asked for."""
    say = logger.warning if options.idmap == "auto" else logger.info
    say("virtio-fs %s: uidmap/gidmap translated by the device, not a user namespace: %s",
        options.tag, why)


def _report(stats_fd: int | None, exc: BaseException) -> None:
    """Tell the VMM (waiting for ``ready``) why the back-end will not serve."""
    if stats_fd is not None:
        try:
            os.write(stats_fd, f"error {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass


def _serve_fd(device: Any, fd: int, stats_fd: int | None, metrics: Path | int | None,
              progress, channel: Any = None) -> int:
    """Serve the one front-end on the connected socket `fd` until it goes away (or SIGTERM)."""
    from devices.virtio.vhost_user.server import BackendServer

    server = BackendServer(device, None, backend_channel=channel)
    previous = {s: signal.signal(s, lambda *_a: server.request_stop())
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if stats_fd is not None:
            StatsResponder(server, device.options.tag, stats_fd).start()
        progress(f"vhost-user-fs back-end: tag {device.options.tag!r} on fd {fd}")
        with server:
            server.serve_connection(socket.socket(fileno=fd))
            text = json.dumps({"exit_status": 0, "devices": {
                f"fs:{device.options.tag}": server.metrics()}}, indent=2, sort_keys=True) + "\n"
        if isinstance(metrics, int):
            os.write(metrics, text.encode())
            os.close(metrics)
        elif metrics is not None:
            metrics.write_text(text)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        device.close()
    return 0


#: A stats frame: its length, then that many bytes of JSON (either direction).
FRAME = struct.Struct("<I")
MAX_STATS_REQUEST = 4096


class StatsResponder:
    """The back-end's half of the VMM's stats channel (vmm/sandbox.py has the other).

    A daemon thread answers, on a socket inherited before the jail, each framed request
    ``{"cmd": "stats"}`` with the counters `python -m vmm device fs --control` would report and
    ``{"cmd": "reset"}`` by zeroing them; it announces ``ready`` (one line) first. EOF (the VMM
    is gone) asks the server to stop."""

    def __init__(self, server: Any, tag: str, fd: int) -> None:
        self.server = server
        self.tag = tag
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.thread = threading.Thread(target=self._serve, name="stats", daemon=True)

    def start(self) -> None:
        self.sock.sendall(b"ready\n")
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                request = _recv_frame(self.sock, MAX_STATS_REQUEST)
                if request is None:
                    break
                try:
                    cmd = json.loads(request).get("cmd")
                    if cmd == "stats":
                        reply: dict = {"ok": True, "metrics": self.server.metrics()}
                    elif cmd == "reset":
                        self.server.reset_metrics()
                        reply = {"ok": True}
                    else:
                        reply = {"ok": False, "error": f"unknown command {cmd!r}"}
                except (ValueError, AttributeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                send_frame(self.sock, json.dumps(reply).encode())
        except OSError as exc:
            logger.warning("stats channel: %s", exc)
        self.server.request_stop()


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(FRAME.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv_frame(sock: socket.socket, limit: int) -> bytes | None:
    head = _recv_exact(sock, FRAME.size)
    if head is None:
        return None
    (n,) = FRAME.unpack(head)
    if n > limit:
        raise OSError(f"frame of {n} bytes (limit {limit})")
    return _recv_exact(sock, n)
