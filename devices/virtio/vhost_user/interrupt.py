"""Driver notifications for a vhost-user backend: one call eventfd (and one error eventfd) per queue.

The front-end gives each vring a *call* eventfd with SET_VRING_CALL; writing it tells the
front-end (QEMU's interrupt injection, or a KVM irqfd) that the used ring has new entries. So
`signal_used_queue(i)` writes queue i's call fd and nothing else: no request passes through the
front-end's process.

The front-end may replace a call fd at any time, also while the worker is running (QEMU swaps
between a masked and an unmasked notifier), so the fds sit behind a lock that the worker holds
while writing: the old fd is never closed under a write in progress, and a number the kernel hands
out again after the close is never written by mistake.

`signal_needs_reset` has no virtio-mmio-style status bit to set here. The spec's channel for "this
ring is broken" is the per-ring *error* eventfd (SET_VRING_ERR); we write every error fd the
front-end gave us and log the event. `signal_config_changed` would need the back-end request
channel (VHOST_USER_PROTOCOL_F_SLAVE_REQ), which this backend does not offer; the virtio-fs config
space never changes, so it is only logged.
"""

from __future__ import annotations

import logging
import os
import threading

from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)


class VhostUserInterrupt:
    """Per-queue call and error eventfds; implements devices.virtio.interrupt.VirtioInterrupt."""

    def __init__(self, num_queues: int) -> None:
        self._lock = threading.Lock()
        self._call: list[int] = [-1] * num_queues
        self._err: list[int] = [-1] * num_queues
        self._signals = 0
        self._log = LogThrottle(logger)

    @property
    def signals(self) -> int:
        """Call-fd writes (for metrics)."""
        with self._lock:
            return self._signals

    def call_fd(self, index: int) -> int:
        with self._lock:
            return self._call[index]

    def err_fd(self, index: int) -> int:
        with self._lock:
            return self._err[index]

    @staticmethod
    def _swap(table: list[int], index: int, fd: int) -> None:
        old, table[index] = table[index], fd
        if old >= 0:
            os.close(old)

    def set_call_fd(self, index: int, fd: int) -> None:
        """Install queue `index`'s call fd (-1: none, the front-end polls); closes the old one."""
        with self._lock:
            self._swap(self._call, index, fd)

    def set_err_fd(self, index: int, fd: int) -> None:
        with self._lock:
            self._swap(self._err, index, fd)

    def _write(self, fd: int) -> None:
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:
            self._log.once("eventfd-write", logging.ERROR,
                           "vhost-user: eventfd %d write failed: %s (further failures not logged)", fd, e)

    # -- VirtioInterrupt --------------------------------------------------------------------------
    def signal_used_queue(self, queue_index: int) -> None:
        with self._lock:
            if 0 <= queue_index < len(self._call) and self._call[queue_index] >= 0:
                self._signals += 1
                self._write(self._call[queue_index])

    def signal_config_changed(self) -> None:
        logger.warning("vhost-user: config change not signalled (no back-end request channel)")

    def signal_needs_reset(self) -> None:
        with self._lock:
            fds = [fd for fd in self._err if fd >= 0]
            for fd in fds:
                self._write(fd)
        logger.error("vhost-user: device needs a reset; signalled %d error eventfd(s)", len(fds))

    def close(self) -> None:
        with self._lock:
            for table in (self._call, self._err):
                for i in range(len(table)):
                    self._swap(table, i, -1)
