"""The interface between a virtio transport and a virtio device (virtio 1.2 sec. 2 and 4).

The transport (mmio.py) owns registers, feature negotiation and queue configuration; a device owns
its config space and the worker that serves its queues. Neither knows the other's details: a device
can be put behind another transport, and the transport knows nothing of file systems.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from devices.memory import GuestMemoryAccess
from devices.virtio.interrupt import VirtioInterrupt
from devices.virtio.queue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, Queue

# linux/virtio_config.h
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80
VIRTIO_F_VERSION_1 = 32

# linux/virtio_ids.h
VIRTIO_ID_FS = 26

# What every device here supports: the modern interface and both ring features queue.py implements.
BASE_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


class VirtioDevice(ABC):
    """A virtio device as the transport sees it.

    Subclasses set `device_type` and `queue_max_sizes` (one entry per queue) and keep their config
    space in `config` (read-only by default; override write_config to accept driver writes).
    """

    device_type: int
    queue_max_sizes: list[int]
    config: bytes = b""
    #: True for a device whose used-ring notifications never pass through the transport: a
    #: vhost-user back-end writes the transport's irqfd itself (its call fd). The transport then
    #: reports the VRING bit in InterruptStatus whenever the device is active (see mmio.py).
    signals_rings_directly: bool = False
    #: Shared memory regions (virtio 1.2 sec. 2.10): id -> (guest-physical base, length). The VMM
    #: places them (a virtio-fs DAX window is id 0); the transport reports them to the driver.
    shm_regions: dict[int, tuple[int, int]] = {}

    def __init__(self) -> None:
        self.acked_features = 0

    @abstractmethod
    def device_features(self) -> int:
        """Feature bits offered to the driver; must include VIRTIO_F_VERSION_1."""

    def ack_features(self, features: int) -> None:
        """The driver accepted `features` (already masked to what we offered) at FEATURES_OK."""
        self.acked_features = features

    def read_config(self, offset: int, size: int) -> bytes:
        """Config space bytes; out-of-range bytes read as 0xff (like a missing register)."""
        data = self.config[offset:offset + size] if offset >= 0 else b""
        return data + b"\xff" * (size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Config writes; read-only by default (the transport logs the attempt)."""
        raise PermissionError("device config space is read-only")

    @abstractmethod
    def activate(self, memory: GuestMemoryAccess, interrupt: VirtioInterrupt, queues: list[Queue | None],
                 queue_events: list[int]) -> None:
        """DRIVER_OK: start serving. `queues[i]` is None for a queue the driver left disabled;
        `queue_events[i]` is the eventfd signalled when the driver notifies queue i."""

    @abstractmethod
    def reset(self) -> None:
        """Stop serving and join the worker; idempotent. The device may be activated again later."""

    def close(self) -> None:
        """Release everything for good (the VM is going away). Idempotent."""
        self.reset()

    def metrics(self) -> dict:
        """JSON-able counters."""
        return {}
