"""`pyvmm fuse-mount`: serve a host directory through /dev/fuse with our FUSE server, no guest.

Mounts, serves until SIGINT/SIGTERM (or an unmount from outside), unmounts and reports, with the
same file-system options (and metrics) as a VM's shared directory. The CLI only parses arguments
and calls :func:`run_fuse_mount`.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from devices.fusedev import HostShare, MountError

from .config import ConfigError, parse_fs_option_items
from .errors import EXIT_FAILURE

#: The tag of a fuse-mount share: it names the trace file and the metrics entry, as a
#: shared directory's tag does in a VM.
FUSE_MOUNT_TAG = "fuse-mount"


def run_fuse_mount(source: str, mountpoint: str, *, option_items: list[str], trace: str | None,
                   metrics: Path | None, progress: Callable[[str], None]) -> int:
    """Mount, serve until SIGINT/SIGTERM (or an unmount from outside), unmount, report."""
    items = list(option_items)
    if trace:
        items += ["trace=true", f"trace_path={trace}"]
    options = parse_fs_option_items("fuse-mount --option", source, FUSE_MOUNT_TAG, items)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum, _frame):
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            share = HostShare(options, mountpoint)
        except MountError as exc:
            raise ConfigError(f"fuse-mount: {exc}") from None
        try:
            share.start()
        except MountError as exc:
            share.shutdown()
            print(f"pyvmm: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        progress(f"serving {options.source} on {share.mountpoint} (fuse.pyvmm, "
                 f"{share.threads} thread(s)); SIGINT or SIGTERM unmounts")
        why = share.wait(stop)
        clean = share.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if why == "stopped":
        name = signal.Signals(signals[0]).name if signals else "stop"
        progress(f"{name}: unmounted {share.mountpoint}" + ("" if clean else
                 " (it was still in use: connection aborted)"))
    else:
        progress(f"{share.mountpoint} was unmounted; stopped serving")
    if metrics:
        metrics.write_text(json.dumps({
            "exit_status": 0 if clean else EXIT_FAILURE, "stop": why,
            "devices": {f"fs:{FUSE_MOUNT_TAG}": share.metrics()}}, indent=2, sort_keys=True) + "\n")
    return 0 if clean else EXIT_FAILURE
