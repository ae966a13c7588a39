"""The virtio-fs device (virtio 1.2 sec. 5.11): config space, queues, and the worker's lifecycle.

Device type 26. Config space is `struct virtio_fs_config` (linux/virtio_fs.h): the tag, 36 bytes
NUL-padded (not terminated when full), then num_request_queues as le32; it is read-only. Queue 0 is
the hiprio queue (FORGETs), queues 1..n carry requests. No device-specific feature bits exist, so no
notification queue. With ``dax: true`` the device has a DAX window (``dax.DaxWindow``), shared
memory region 0, which the VMM places in guest-physical memory and registers with KVM.

One worker thread serves all queues (Linux 6.1 only ever uses the first request queue anyway). The
FileSystem and its FUSE server are built once per device, so a bad share fails when the VM is
assembled; a device reset ends the FUSE session through the server (``Server.end_session``: the
session module is the one place a session starts and ends) and the next INIT starts a new one.

A reset runs on a vCPU thread (the driver writes Status=0), so it waits at most ``stop_timeout``
for the worker. A worker stuck in a request is left behind and logged; until it has finished, the
device refuses to be activated again, which the transport reports as DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from collections.abc import Callable

from devices.memory import GuestMemoryAccess
from devices.virtio.device import BASE_FEATURES, VIRTIO_ID_FS, VirtioDevice
from devices.virtio.fs.dax import DaxMapper, DaxWindow, HasDaxWindow
from devices.virtio.fs.options import DEFAULT_MAX_WRITE, FS_MAX_TAG_LEN, FsOptions
from devices.virtio.fs.worker import FsWorker, WorkerCounters, os_thread_name
from devices.virtio.interrupt import VirtioInterrupt
from devices.virtio.queue import Queue
from fuse.logthrottle import LogThrottle
from fuse.metrics import Metrics
from fuse.trace import Trace

logger = logging.getLogger(__name__)

QUEUE_SIZE = 1024  # per queue maximum; the guest picks the actual size
#: How long a reset (a vCPU thread) waits for the request in progress before giving up on it.
STOP_TIMEOUT = 1.0

FsFactory = Callable[[FsOptions], object]  # returns a fuse.filesystem.FileSystem


def passthrough_factory(options: FsOptions):
    """The default FileSystem: the host directory `options.source`."""
    from devices.virtio.fs import idmap
    from devices.virtio.fs.passthrough import PassthroughFs

    # uidmap/gidmap: the device translates ids around the passthrough (idmap.py).
    return idmap.wrap(PassthroughFs(options), options.uidmap, options.gidmap)


def make_server(fs, metrics: Metrics, trace: Trace | None, max_write: int = DEFAULT_MAX_WRITE):
    """The device's FUSE server over `fs`, feeding the device's metrics and trace."""
    from fuse.server import Server

    return Server(fs, max_write=max_write, metrics=metrics, trace=trace)


def config_space(tag: str, num_request_queues: int) -> bytes:
    """`struct virtio_fs_config` bytes."""
    raw = tag.encode("utf-8")
    if not 1 <= len(raw) <= FS_MAX_TAG_LEN:
        raise ValueError(f"tag must be 1..{FS_MAX_TAG_LEN} bytes")
    return raw.ljust(FS_MAX_TAG_LEN, b"\0") + struct.pack("<I", num_request_queues)


def default_trace_path(tag: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    return os.path.join(tempfile.gettempdir(), f"pyvmm-virtio-fs-{safe}-{os.getpid()}.trace.jsonl")


class FsDevice(HasDaxWindow, VirtioDevice):
    """A virtio-fs device sharing `options.source` under `options.tag`.

    `fs_factory(options)` builds the FileSystem (default: PassthroughFs) so tests can inject another.
    `dax_mapper`: how the DAX window maps (default: into this process; a back-end process passes
    its back-end request channel, see dax.py).
    """

    device_type = VIRTIO_ID_FS

    def __init__(self, options: FsOptions, fs_factory: FsFactory | None = None, *,
                 queue_size: int = QUEUE_SIZE, max_write: int | None = None,
                 stop_timeout: float = STOP_TIMEOUT, dax_mapper: DaxMapper | None = None) -> None:
        super().__init__()
        self._dax_mapper = dax_mapper
        self.options = options
        self.stop_timeout = stop_timeout
        self.max_write = options.max_write if max_write is None else max_write
        self.queue_max_sizes = [queue_size] * (1 + options.num_request_queues)
        self.config = config_space(options.tag, options.num_request_queues)
        self.fuse_metrics = Metrics()
        self.counters = WorkerCounters()
        self.trace: Trace | None = None
        if options.trace:
            path = options.trace_path or default_trace_path(options.tag)
            self.trace = Trace.open(path)
            logger.info("virtio-fs %s: tracing requests to %s", options.tag, path)
        self.dax_window: DaxWindow | None = None
        try:
            self.fs = (fs_factory or passthrough_factory)(options)
            if options.dax:
                self._attach_dax_window()
            self.server = make_server(self.fs, self.fuse_metrics, self.trace, self.max_write)
        except BaseException:
            if self.trace is not None:
                self.trace.close()
            if self.dax_window is not None:
                self.dax_window.close()
            raise
        self._worker: FsWorker | None = None
        self._stuck: FsWorker | None = None  # a worker that did not stop in time
        # Log lines a guest can repeat with every activation, thinned across all of them. The
        # worker's lines keep the worker module's logger name; the throttle lives here, with the
        # device, so that it spans the workers of successive activations.
        self._log = LogThrottle(logger)
        self._worker_log = LogThrottle(logging.getLogger(FsWorker.__module__))

    def _attach_dax_window(self) -> None:
        """Reserve the window's host address space and hand it to the filesystem's hooks."""
        if not hasattr(self.fs, "dax"):
            raise ValueError(f"virtio-fs {self.options.tag}: dax needs a filesystem with a DAX "
                             f"window hook ({type(self.fs).__name__} has none)")
        self.dax_window = DaxWindow(self.options.dax_window_mib << 20, mapper=self._dax_mapper)
        self.fs.dax = self.dax_window

    @property
    def worker_thread(self):
        """The running worker thread, or None (for tests and diagnostics)."""
        return self._worker.thread if self._worker is not None else None

    def device_features(self) -> int:
        return BASE_FEATURES

    def activate(self, memory: GuestMemoryAccess, interrupt: VirtioInterrupt, queues: list[Queue | None],
                 queue_events: list[int]) -> None:
        if self._worker is not None:
            raise RuntimeError("virtio-fs device is already active")
        if self._stuck is not None:
            if not self._stuck.stop(0):
                raise RuntimeError(f"the previous worker is still stuck in "
                                   f"{self._stuck.stuck_in()}; the device cannot restart "
                                   "until that host call returns")
            self._stuck = None
        worker = FsWorker(f"virtio-fs:{self.options.tag}", self.server, interrupt, queues,
                          queue_events, self.counters, self._worker_log,
                          os_name=os_thread_name(self.options.tag))
        worker.start()
        self._worker = worker
        logger.debug("virtio-fs %s: active with queue sizes %s", self.options.tag,
                     [q.size if q else None for q in queues])

    def reset(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and not worker.stop(self.stop_timeout):
            self._stuck = worker
            self._log.sample("stuck", logging.ERROR,
                             "virtio-fs %s: the worker did not stop within %.1f s: it is stuck in"
                             " %s; left behind (the device needs a reset once that call returns)",
                             self.options.tag, self.stop_timeout, worker.stuck_in())
        self.server.end_session()  # the FUSE session ends with the driver; every host fd goes

    def close(self) -> None:
        self.reset()
        close_fs = getattr(self.fs, "close", None)  # a FileSystem has it; a test double may not
        if close_fs is not None:
            close_fs()
        if self.trace is not None:
            self.trace.close()
            self.trace = None
        if self.dax_window is not None:
            self.dax_window.close()

    def metrics(self) -> dict:
        """The FUSE server's counters plus the virtio transport's, under "virtio"."""
        m = self.fuse_metrics.snapshot()
        m["virtio"] = self.counters.snapshot()
        if self.dax_window is not None:
            m["dax"] = self.dax_window.metrics()
        return m

    def reset_metrics(self) -> None:
        self.fuse_metrics.reset()
        self.counters.reset()
