"""virtio-mmio transport, version 2 (virtio 1.2 sec. 4.2.2).

A 0x1000-byte MMIO window of 32-bit registers plus the device's config space at 0x100. It negotiates
features, records the driver's queue layout, and on DRIVER_OK turns that layout into `Queue` objects
and hands them to the device; on a Status write of 0 it stops the device and forgets everything.

Queue notifications normally never reach this code: the VMM registers `queue_events[i]` as a KVM
ioeventfd on QueueNotify with datamatch i. A notify that still arrives as an MMIO exit is forwarded
to the same eventfd, so the device sees one notification path either way.

The guest is hostile: any bad width, offset, value or ring address is logged once and ignored
(reads return all ones) or turned into DEVICE_NEEDS_RESET; nothing here raises into the vCPU loop.

**Devices whose rings another process serves** (vhost-user, `VirtioDevice.signals_rings_directly`):
the transport still owns every register, but the back-end's call eventfd *is* this transport's
irqfd, so used-ring interrupts reach the guest without this process and the VRING bit of
InterruptStatus is never set by a `signal_used_queue`. Linux's `vm_interrupt` reads InterruptStatus
and walks the rings only if that bit is set, so while such a device is active InterruptStatus
always reports VRING (plus whatever CONFIG bit is pending). A ring check without new used entries
is legal and cheap (`vring_interrupt` returns IRQ_NONE) and happens only when the interrupt was a
config change (DEVICE_NEEDS_RESET), which is rare. The alternative QEMU uses for virtio-mmio -- its
own call eventfds, read by a thread that sets the bit and raises the interrupt -- wakes a thread of
this process (and takes the GIL beside the vCPU threads) on every interrupt, which is exactly what
the split is there to avoid; `bench/fuse_backends.py` measures the VMM's CPU per request with the
direct path (it stays at the vCPU exits of the InterruptStatus read and ACK that every virtio-mmio
interrupt costs anyway).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass

from devices.memory import GuestMemoryAccess
from devices.virtio.device import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from devices.virtio.interrupt import VIRTIO_MMIO_INT_VRING, Interrupt
from devices.virtio.queue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Queue,
    QueueConfigError,
)
from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)
#: A guest can fail activations or give up on a device as often as it resets it: sampled.
_guest_log = LogThrottle(logger)

# linux/virtio_mmio.h
VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

MMIO_SIZE = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU": what Linux and tools expect from an emulated device

# Bits the driver may write to Status; NEEDS_RESET is set by the device only.
_DRIVER_STATUS_BITS = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
                       | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED)
# Each status bit and the bit that must already be set before it (virtio 1.2 sec. 3.1.1).
_STATUS_PREREQ = {
    VIRTIO_CONFIG_S_ACKNOWLEDGE: 0,
    VIRTIO_CONFIG_S_DRIVER: VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_FEATURES_OK: VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK: VIRTIO_CONFIG_S_FEATURES_OK,
}
_ALL_ONES = 0xFFFFFFFF


@dataclass
class QueueState:
    """What the driver configured for one queue (nothing is trusted until activation)."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0

    def __post_init__(self) -> None:
        self.size = self.max_size  # QueueNum's reset value: the driver may keep the maximum


def _set_half(value: int, half: int, high: bool) -> int:
    if high:
        return (value & 0xFFFFFFFF) | (half << 32)
    return (value & ~0xFFFFFFFF) | half


class MmioTransport:
    """A virtio device behind a virtio-mmio v2 register window (a BusDevice of size 0x1000)."""

    size = MMIO_SIZE

    def __init__(self, device: VirtioDevice, memory: GuestMemoryAccess, irq_fd: int) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = Interrupt(irq_fd)
        self._lock = threading.Lock()  # vCPU threads may access the window concurrently
        # Bad accesses once per kind (.once); events a guest can repeat with every reset (.sample).
        self._log = LogThrottle(logger)
        self._offered = device.device_features()
        if not self._offered >> VIRTIO_F_VERSION_1 & 1:
            raise ValueError("a virtio 1.x device must offer VIRTIO_F_VERSION_1")
        self.queue_events: list[int] = []
        try:
            for _ in device.queue_max_sizes:
                self.queue_events.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        except OSError:
            self._close_events()
            raise
        self._queues: list[Queue | None] = []
        self._closed = False
        self._reset_state()

    # -- state ------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.config_generation = 0
        self.queue_states = [QueueState(m) for m in self.device.queue_max_sizes]
        self.activated = False

    @property
    def acked_features(self) -> int:
        """Driver features restricted to what we offered."""
        return self.driver_features & self._offered

    def _selected_queue(self) -> QueueState | None:
        if 0 <= self.queue_sel < len(self.queue_states):
            return self.queue_states[self.queue_sel]
        return None

    def _reset_device(self, *, final: bool = False) -> None:
        """Status 0: stop the worker, forget all negotiated state (virtio 1.2 sec. 2.4)."""
        if final:
            self.device.close()
        else:
            self.device.reset()
        for q in self._queues:
            if q is not None:
                q.close()
        self._queues = []
        for fd in self.queue_events:  # drop notifications aimed at the old rings
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        self.interrupt.reset()
        self._reset_state()

    # -- BusDevice --------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset >= VIRTIO_MMIO_CONFIG:
            if size not in (1, 2, 4, 8) or offset + size > MMIO_SIZE:
                self._log.once(f"cfg-read-{size}", logging.WARNING,
                               "virtio-mmio: bad config read offset=%#x size=%d", offset, size)
                return b"\xff" * max(size, 0)
            try:
                return self.device.read_config(offset - VIRTIO_MMIO_CONFIG, size)
            except Exception as e:  # a device bug must not kill the vCPU (nor flood the log)
                _guest_log.bug("virtio-mmio read_config", e, "reading 0xff")
                return b"\xff" * size
        if size != 4 or offset % 4:
            self._log.once(f"read-width-{offset:#x}-{size}", logging.WARNING,
                           "virtio-mmio: ignoring %d-byte read at %#x "
                           "(registers are 32-bit)", size, offset)
            return b"\xff" * max(size, 0)
        with self._lock:
            value = self._read_register(offset)
        return struct.pack("<I", value & 0xFFFFFFFF)

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset >= VIRTIO_MMIO_CONFIG:
            if size not in (1, 2, 4, 8) or offset + size > MMIO_SIZE:
                self._log.once(f"cfg-write-{size}", logging.WARNING,
                               "virtio-mmio: bad config write offset=%#x size=%d", offset, size)
                return
            try:
                self.device.write_config(offset - VIRTIO_MMIO_CONFIG, bytes(data))
            except PermissionError:
                self._log.once("cfg-ro", logging.WARNING,
                               "virtio-mmio: ignoring write to read-only config space at %#x", offset)
            except Exception as e:
                _guest_log.bug("virtio-mmio write_config", e, "write ignored")
            return
        if size != 4 or offset % 4:
            self._log.once(f"write-width-{offset:#x}-{size}", logging.WARNING,
                           "virtio-mmio: ignoring %d-byte write at %#x "
                           "(registers are 32-bit)", size, offset)
            return
        value = struct.unpack("<I", data)[0]
        if offset == VIRTIO_MMIO_QUEUE_NOTIFY:  # hot path, no state involved
            self._notify(value)
            return
        with self._lock:
            self._write_register(offset, value)

    # -- registers --------------------------------------------------------------------------------
    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return MAGIC
        if offset == VIRTIO_MMIO_VERSION:
            return VERSION
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_type
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return VENDOR_ID
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self._offered >> (32 * self.device_features_sel) & 0xFFFFFFFF
        if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            return self.device_features_sel
        if offset == VIRTIO_MMIO_DRIVER_FEATURES:
            if self.driver_features_sel > 1:
                return 0
            return self.driver_features >> (32 * self.driver_features_sel) & 0xFFFFFFFF
        if offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            return self.driver_features_sel
        if offset == VIRTIO_MMIO_QUEUE_SEL:
            return self.queue_sel
        if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
            return q.max_size if q else 0  # 0: "queue not available" (sec. 4.2.2)
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            return q.size if q else 0
        if offset == VIRTIO_MMIO_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            if self.activated and self.device.signals_rings_directly:
                return self.interrupt.status | VIRTIO_MMIO_INT_VRING  # see the module docstring
            return self.interrupt.status
        if offset == VIRTIO_MMIO_STATUS:
            return self.status | (VIRTIO_CONFIG_S_NEEDS_RESET if self.interrupt.needs_reset else 0)
        if offset in (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH):
            return (q.desc >> (32 if offset & 4 else 0)) & 0xFFFFFFFF if q else 0
        if offset in (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH):
            return (q.avail >> (32 if offset & 4 else 0)) & 0xFFFFFFFF if q else 0
        if offset in (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH):
            return (q.used >> (32 if offset & 4 else 0)) & 0xFFFFFFFF if q else 0
        if offset == VIRTIO_MMIO_SHM_SEL:
            return self.shm_sel
        if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH,
                      VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH):
            return self._shm_register(offset)
        if offset == VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        self._log.once(f"read-{offset:#x}", logging.WARNING,
                       "virtio-mmio: read of unknown/write-only register %#x", offset)
        return _ALL_ONES

    def _shm_register(self, offset: int) -> int:
        """SHMLen/SHMBase of the region SHMSel selects (sec. 4.2.2). A region that does not exist
        reads as length ~0 (all ones in both halves), which Linux's vm_get_shm_region takes as
        "absent"; its base reads as all ones too."""
        region = self.device.shm_regions.get(self.shm_sel)
        if region is None:
            return _ALL_ONES
        base, length = region
        value = length if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH) else base
        return value >> 32 if offset & 4 else value & 0xFFFFFFFF

    def _write_register(self, offset: int, value: int) -> None:
        if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset in (VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_DESC_LOW,
                        VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                        VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH):
            self._write_queue_register(offset, value)
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset == VIRTIO_MMIO_STATUS:
            self._write_status(value)
        elif offset == VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        else:
            self._log.once(f"write-{offset:#x}", logging.WARNING,
                           "virtio-mmio: write %#x to read-only/unknown register %#x",
                           value, offset)

    def _write_driver_features(self, value: int) -> None:
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK or not self.status & VIRTIO_CONFIG_S_DRIVER:
            self._log.once("features-late", logging.WARNING,
                           "virtio-mmio: DriverFeatures written in status %#x, ignored",
                           self.status)
            return
        if self.driver_features_sel > 1:
            if value:
                self._log.once("features-page", logging.WARNING,
                               "virtio-mmio: driver set features in page %d we never "
                               "offered, dropped", self.driver_features_sel)
            return
        self.driver_features = _set_half(self.driver_features, value, self.driver_features_sel == 1)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            self._log.once("queue-sel", logging.WARNING,
                           "virtio-mmio: queue register %#x written for missing queue %d",
                           offset, self.queue_sel)
            return
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self._log.once("queue-live", logging.WARNING,
                           "virtio-mmio: queue register %#x written after DRIVER_OK, ignored", offset)
            return
        if offset == VIRTIO_MMIO_QUEUE_READY:
            q.ready = bool(value & 1)
            return
        if q.ready:
            self._log.once("queue-ready", logging.WARNING,
                           "virtio-mmio: queue %d register %#x written while ready, ignored",
                           self.queue_sel, offset)
            return
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            q.size = value  # validated at DRIVER_OK
        elif offset in (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH):
            q.desc = _set_half(q.desc, value, bool(offset & 4))
        elif offset in (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH):
            q.avail = _set_half(q.avail, value, bool(offset & 4))
        else:
            q.used = _set_half(q.used, value, bool(offset & 4))

    def _notify(self, value: int) -> None:
        if not 0 <= value < len(self.queue_events) or self._closed:
            self._log.once("notify", logging.WARNING, "virtio-mmio: notify for unknown queue %d", value)
            return
        try:
            os.eventfd_write(self.queue_events[value], 1)
        except (OSError, IndexError) as e:  # racing close(): the device is going away anyway
            self._log.once("notify-closed", logging.WARNING, "virtio-mmio: notify for queue %d dropped: %s", value, e)

    # -- device status ------------------------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset_device()
            return
        value &= _DRIVER_STATUS_BITS
        old = self.status
        if old & ~value & _DRIVER_STATUS_BITS:
            self._log.once("status-clear", logging.WARNING,
                           "virtio-mmio: status %#x -> %#x clears bits without a reset, "
                           "ignored", old, value)
            return
        new = old
        for bit, prereq in _STATUS_PREREQ.items():
            if value & bit and not old & bit:
                if prereq and not new & prereq:
                    self._log.once(f"status-order-{bit}", logging.WARNING,
                                   "virtio-mmio: status bit %#x set before %#x, ignored",
                                   bit, prereq)
                    continue
                if bit == VIRTIO_CONFIG_S_FEATURES_OK and not self._features_ok():
                    continue  # the driver re-reads Status and sees FEATURES_OK missing
                new |= bit
                if bit == VIRTIO_CONFIG_S_DRIVER_OK:
                    self.status = new
                    self._activate()
        if value & VIRTIO_CONFIG_S_FAILED and not old & VIRTIO_CONFIG_S_FAILED:
            self._log.sample("failed", logging.WARNING,
                             "virtio-mmio: driver gave up on device type %d (FAILED)",
                             self.device.device_type)
            new |= VIRTIO_CONFIG_S_FAILED
            if self.activated:
                self.device.reset()  # the guest will not use it any more; stop serving
        self.status = new

    def _features_ok(self) -> bool:
        acked = self.acked_features
        if self.driver_features & ~self._offered:
            self._log.once("features-extra", logging.WARNING,
                           "virtio-mmio: driver acked unoffered features %#x, dropped",
                           self.driver_features & ~self._offered)
        self.driver_features = acked
        if not acked >> VIRTIO_F_VERSION_1 & 1:
            self._log.once("no-version-1", logging.WARNING,
                           "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; refusing "
                           "FEATURES_OK (legacy drivers are not supported)")
            return False
        self.device.ack_features(acked)
        return True

    def _activate(self) -> None:
        """DRIVER_OK: build queues from the driver's layout and start the device, or NEEDS_RESET."""
        event_idx = bool(self.acked_features >> VIRTIO_RING_F_EVENT_IDX & 1)
        indirect = bool(self.acked_features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        queues: list[Queue | None] = []
        try:
            for i, st in enumerate(self.queue_states):
                if not st.ready:
                    queues.append(None)
                    continue
                if st.size > st.max_size:
                    raise QueueConfigError(f"queue {i} size {st.size} exceeds maximum {st.max_size}")
                try:
                    queues.append(Queue(self.memory, st.size, st.desc, st.avail, st.used, event_idx,
                                        indirect=indirect))
                except QueueConfigError as e:
                    raise QueueConfigError(f"queue {i}: {e}") from None
            if not any(q is not None for q in queues):
                raise QueueConfigError("DRIVER_OK with no queue ready")
            self.device.activate(self.memory, self.interrupt, queues, list(self.queue_events))
        except Exception as e:  # QueueConfigError, or a device that could not start
            self._log.sample("activate", logging.ERROR,
                             "virtio-mmio: cannot activate device type %d: %s; setting "
                             "DEVICE_NEEDS_RESET", self.device.device_type, e)
            for q in queues:
                if q is not None:
                    q.close()
            self.interrupt.signal_needs_reset()
            return
        self._queues = queues
        self.activated = True

    # -- lifecycle --------------------------------------------------------------------------------
    def _close_events(self) -> None:
        for fd in self.queue_events:
            os.close(fd)
        self.queue_events = []

    def close(self) -> None:
        """Stop the device and close the queue eventfds (unregister the ioeventfds first). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._reset_device(final=True)
            self._closed = True
            self._close_events()

    def metrics(self) -> dict:
        """The device's counters plus transport state."""
        m = dict(self.device.metrics())
        m.setdefault("transport", {}).update({
            "status": self.status, "interrupts": self.interrupt.signals,
            "acked_features": self.acked_features,
        })
        return m
