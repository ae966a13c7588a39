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
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

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


def fs_options(shared_dir: str | None, config: Path | None):
    """The one share to serve, from --shared-dir or from a config file's single fs device."""
    if shared_dir is not None:
        return parse_shared_dir(shared_dir)
    assert config is not None
    cfg = load_config(config)
    if len(cfg.devices) != 1 or not isinstance(cfg.devices[0], FsOptions):
        raise ConfigError(f"{config}: devices: a back-end serves exactly one `type: fs` device, "
                          f"found {len(cfg.devices)} device(s)")
    return cfg.devices[0]


def run_fs_backend(socket_path: str, *, shared_dir: str | None = None, config: Path | None = None,
                   once: bool = False, metrics: Path | None = None, control: str | None = None,
                   progress=lambda msg: print(f"pyvmm: {msg}", file=sys.stderr, flush=True)) -> int:
    from devices.virtio.fs.device import FsDevice
    from devices.virtio.vhost_user.server import BackendServer, SocketInUse

    options = fs_options(shared_dir, config)
    device = FsDevice(options)
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
            server = BackendServer(device, socket_path, once=once)
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
