"""Interrupt delivery for a virtio-mmio device.

The transport owns the InterruptStatus register, but the device's worker thread is what raises
interrupts; this object is the one thing both share. It has its own lock and never calls back into
the transport, so a worker signalling while a vCPU thread resets the device (and joins that worker)
cannot deadlock. Delivery is an `os.eventfd_write` on the irqfd that the VMM registered with KVM
(KVM_IRQFD, edge-triggered GSI), so raising an interrupt involves no vCPU thread and no KVM code here.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Protocol

from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

# linux/virtio_mmio.h
VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1


class VirtioInterrupt(Protocol):
    """What a device's worker needs from its transport to notify the driver.

    Implemented by `Interrupt` (virtio-mmio: InterruptStatus + one irqfd) and by
    `devices.virtio.vhost_user.interrupt.VhostUserInterrupt` (one call eventfd per queue).
    """

    def signal_used_queue(self, queue_index: int) -> None: ...

    def signal_config_changed(self) -> None: ...

    def signal_needs_reset(self) -> None: ...


class Interrupt:
    """InterruptStatus bits + the irqfd, plus the device-set DEVICE_NEEDS_RESET condition."""

    def __init__(self, irq_fd: int) -> None:
        self.irq_fd = irq_fd
        self._lock = threading.Lock()
        self._status = 0
        self._needs_reset = False
        self._signals = 0
        self._log = LogThrottle(logger)

    @property
    def status(self) -> int:
        """The InterruptStatus register value."""
        with self._lock:
            return self._status

    @property
    def needs_reset(self) -> bool:
        with self._lock:
            return self._needs_reset

    @property
    def signals(self) -> int:
        """How many interrupts were raised (for metrics)."""
        with self._lock:
            return self._signals

    def _signal(self, bits: int) -> None:
        with self._lock:
            self._status |= bits
            self._signals += 1
        # Always kick the irqfd, even if the bit was already pending: the guest may have read
        # InterruptStatus already and be about to ACK it, and a skipped edge would then be lost.
        try:
            os.eventfd_write(self.irq_fd, 1)
        except OSError as e:
            self._log.once("irqfd-write", logging.ERROR, "virtio interrupt: irqfd %d write failed: %s",
                           self.irq_fd, e)

    def signal_used_queue(self, queue_index: int = 0) -> None:
        """Tell the driver that used ring `queue_index` has new entries.

        virtio-mmio has one interrupt line and one "some used ring changed" bit for all queues,
        so the index is not needed here; transports with one notifier per queue (vhost-user's
        call eventfds) use it.
        """
        self._signal(VIRTIO_MMIO_INT_VRING)

    def signal_config_changed(self) -> None:
        """Tell the driver that the config space (or device status) changed."""
        self._signal(VIRTIO_MMIO_INT_CONFIG)

    def signal_needs_reset(self) -> None:
        """The device hit an unrecoverable error: report DEVICE_NEEDS_RESET (virtio 1.2 sec. 2.1.2).

        The spec requires a configuration change notification once DRIVER_OK was set.
        """
        with self._lock:
            self._needs_reset = True
        self.signal_config_changed()

    def ack(self, bits: int) -> None:
        """InterruptACK: the driver has handled these InterruptStatus bits."""
        with self._lock:
            self._status &= ~bits

    def reset(self) -> None:
        """Device reset: nothing pending, no error condition."""
        with self._lock:
            self._status = 0
            self._needs_reset = False
