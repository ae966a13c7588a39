"""A shared directory served on the host through /dev/fuse instead of to a guest through virtqueues.

Everything above the transport is the virtio-fs device's: the same ``FsOptions``, the same
``PassthroughFs`` and ``fuse.Server`` (built by the same factories), the same metrics and trace.
Only the bytes move differently, so what a host process sees on the mount is what a guest would
see on the share (policies, permissions, errnos), and a host-side test suite such as pjdfstest
checks the server at native speed.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from devices.virtio.fs.device import default_trace_path, make_server, passthrough_factory
from devices.virtio.fs.options import FsOptions
from fuse.metrics import Metrics
from fuse.trace import Trace

from .mount import FuseMount, MountError, check_mountpoint, mount_fuse
from .session import FuseSession

logger = logging.getLogger(__name__)

#: Seconds to let the kernel end the connection after a lazy unmount before we abort it.
UNMOUNT_GRACE = 5.0


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_not_nested(source: str, mountpoint: str) -> None:
    """Refuse a mount point inside the share or a share inside the mount point: the server would
    then resolve names through its own mount and wait for itself."""
    src = os.path.realpath(source)
    mnt = os.path.realpath(mountpoint)
    if _inside(mnt, src) or _inside(src, mnt):
        raise MountError(f"mount point {mountpoint} and source {source} must not contain "
                            "each other (the server would wait on its own mount)")


class HostShare:
    """One shared directory mounted on the host: mount(), serve until stopped, unmount().

    ``threads`` serving threads (``num_request_queues`` of the options, as each stands in for a
    request queue) answer the kernel's requests concurrently.
    """

    def __init__(self, options: FsOptions, mountpoint: str, *, fs_factory=None,
                 max_write: int | None = None, threads: int | None = None) -> None:
        self.options = options
        self.mountpoint = check_mountpoint(mountpoint)
        check_not_nested(options.source, self.mountpoint)
        self.threads = threads or options.num_request_queues
        self.fuse_metrics = Metrics()
        self.trace: Trace | None = None
        if options.trace:
            path = options.trace_path or default_trace_path(options.tag)
            self.trace = Trace.open(path)
            logger.info("fuse-mount: tracing requests to %s", path)
        try:
            self.fs = (fs_factory or passthrough_factory)(options)
            self.server = make_server(self.fs, self.fuse_metrics, self.trace,
                                      options.max_write if max_write is None else max_write)
        except BaseException:
            self._close_trace()
            raise
        self.mount: FuseMount | None = None
        self.session: FuseSession | None = None

    def start(self) -> None:
        """Mount and start serving (the kernel's first request, INIT, is answered at once)."""
        if self.mount is not None:
            raise RuntimeError("already mounted")
        self.mount = mount_fuse(self.mountpoint, self.options.source)
        self.session = FuseSession(self.mount.fd, self.server, threads=self.threads,
                                   name=f"fuse-mount:{self.mountpoint}")
        self.session.start()

    def wait(self, stop: threading.Event, poll: float = 0.2) -> str:
        """Serve until ``stop`` is set ("stopped") or the mount goes away ("unmounted")."""
        assert self.session is not None
        while True:
            if stop.is_set():
                return "stopped"
            if self.session.disconnected or not self.session.alive():
                return "unmounted"
            stop.wait(poll)

    def shutdown(self, grace: float = UNMOUNT_GRACE) -> bool:
        """Unmount (lazily), let the kernel end the connection, stop serving, release everything.

        Returns True when the connection ended cleanly; False when processes still held the
        mount after ``grace`` seconds and the connection had to be aborted (they get ENOTCONN).
        """
        clean = True
        if self.mount is not None and self.session is not None:
            if not self.session.disconnected:
                try:
                    self.mount.unmount()
                except OSError as e:
                    logger.warning("fuse-mount: unmount of %s failed: %s", self.mountpoint, e)
                deadline = time.monotonic() + grace
                # With nobody inside, the superblock dies with the unmount and the kernel
                # answers our next read with ENODEV.
                clean = self.session.wait_disconnected(max(0.0, deadline - time.monotonic()))
                if not clean:
                    logger.warning("fuse-mount: %s still in use %.0f s after the lazy unmount; "
                                   "aborting the connection", self.mountpoint, grace)
            self.mount.mounted = False
            if not self.session.stop():
                logger.warning("fuse-mount: a serving thread is still busy; closing anyway")
            self.mount.close()  # if the kernel still had the connection, this aborts it
        self.server.end_session()  # the session owner ends it (fuse/session.py)
        self._close_trace()
        return clean

    def _close_trace(self) -> None:
        if self.trace is not None:
            self.trace.close()
            self.trace = None

    def metrics(self) -> dict:
        """The FUSE server's counters plus the transport's, under "fusedev"."""
        m = self.fuse_metrics.snapshot()
        m["fusedev"] = self.session.counters.snapshot() if self.session else {}
        return m
