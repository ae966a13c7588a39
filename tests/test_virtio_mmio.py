"""virtio-mmio v2 transport tests: registers, negotiation, status state machine, queue setup."""

from __future__ import annotations

import os

import pytest

from devices.bus_device import BusDevice
from devices.memory import GuestMemory
from devices.virtio.device import (
    BASE_FEATURES,
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK,
    VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from devices.virtio.interrupt import VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING
from devices.virtio.mmio import MmioTransport
from devices.virtio.queue import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from tests.fakes import MmioDriver

DEVICE_BIT = 1 << 3  # a device-specific feature the test device offers


class RecordingDevice(VirtioDevice):
    """A minimal real VirtioDevice that remembers what the transport handed it."""

    device_type = 42
    queue_max_sizes = [16, 8]
    config = bytes(range(1, 13))

    def __init__(self) -> None:
        super().__init__()
        self.active = None
        self.resets = 0
        self.fail_activate = False

    def device_features(self) -> int:
        return BASE_FEATURES | DEVICE_BIT

    def activate(self, memory, interrupt, queues, queue_events) -> None:
        if self.fail_activate:
            raise RuntimeError("cannot start")
        self.active = (memory, interrupt, queues, queue_events)

    def reset(self) -> None:
        self.resets += 1
        self.active = None


@pytest.fixture
def env():
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dev = RecordingDevice()
    t = MmioTransport(dev, GuestMemory.from_ranges([(0, 1 << 20)]), irq)
    yield t, dev, MmioDriver(t), irq
    t.close()
    os.close(irq)


def irq_count(irq: int) -> int:
    try:
        return os.eventfd_read(irq)
    except BlockingIOError:
        return 0


def test_is_a_bus_device(env):
    t, *_ = env
    assert isinstance(t, BusDevice)
    assert t.size == 0x1000


def test_identity_registers(env):
    _, _, d, _ = env
    assert d.r(0x00) == 0x74726976
    assert d.r(0x04) == 2
    assert d.r(0x08) == 42
    assert d.r(0x0C) == 0x554D4551


def test_device_feature_pages(env):
    _, _, d, _ = env
    feats = d.device_features()
    assert feats == BASE_FEATURES | DEVICE_BIT
    assert feats >> VIRTIO_F_VERSION_1 & 1
    assert feats >> VIRTIO_RING_F_EVENT_IDX & 1 and feats >> VIRTIO_RING_F_INDIRECT_DESC & 1
    d.w(0x14, 2)
    assert d.r(0x10) == 0


def test_feature_negotiation_drops_unoffered_bits(env):
    t, dev, d, _ = env
    status = d.negotiate(BASE_FEATURES | DEVICE_BIT | (1 << 5) | (1 << 40))
    assert status & FEATURES_OK
    assert t.acked_features == BASE_FEATURES | DEVICE_BIT
    assert dev.acked_features == BASE_FEATURES | DEVICE_BIT
    d.w(0x24, 1)
    assert d.r(0x20) == 1  # only VERSION_1 survives in the high page


def test_features_ok_refused_without_version_1(env):
    t, dev, d, _ = env
    status = d.negotiate(DEVICE_BIT)
    assert status == ACK | DRIVER  # FEATURES_OK did not stick
    d.setup_queue(0, 16, 0x1000, 0x1400, 0x1800)
    d.w(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert not d.r(0x70) & DRIVER_OK
    assert dev.active is None


def test_driver_features_frozen_after_features_ok(env):
    t, _, d, _ = env
    d.negotiate(BASE_FEATURES)
    d.w(0x24, 0)
    d.w(0x20, 0)
    assert t.acked_features == BASE_FEATURES


def test_status_bits_must_come_in_order(env):
    _, dev, d, _ = env
    d.w(0x70, DRIVER)  # DRIVER before ACKNOWLEDGE
    assert d.r(0x70) == 0
    d.w(0x70, ACK)
    d.w(0x70, ACK | DRIVER | DRIVER_OK)  # DRIVER_OK without FEATURES_OK
    assert d.r(0x70) == ACK | DRIVER
    d.w(0x70, ACK)  # clearing bits without a reset
    assert d.r(0x70) == ACK | DRIVER
    d.w(0x70, ACK | DRIVER | NEEDS_RESET)  # the driver cannot set NEEDS_RESET
    assert d.r(0x70) == ACK | DRIVER
    assert dev.active is None


def test_activation_builds_configured_queues(env):
    t, dev, d, _ = env
    status = d.bring_up(sizes=(16, 4))
    assert status == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    memory, interrupt, queues, events = dev.active
    assert memory is t.memory and interrupt is t.interrupt
    assert [q.size for q in queues] == [16, 4]
    assert (queues[0].desc_table, queues[0].avail_ring, queues[0].used_ring) == (0x1000, 0x1400, 0x1800)
    assert queues[1].desc_table == 0x3000
    assert all(q.event_idx and q.indirect for q in queues)
    assert events == t.queue_events and len(events) == 2


def test_activation_without_ring_features(env):
    _, dev, d, _ = env
    d.bring_up(features=1 << VIRTIO_F_VERSION_1)
    queues = dev.active[2]
    assert not queues[0].event_idx and not queues[0].indirect


def test_unready_queue_is_passed_as_none(env):
    _, dev, d, _ = env
    d.bring_up(sizes=(16,))
    assert dev.active[2][1] is None


def test_queue_num_max_and_missing_queue(env):
    _, _, d, _ = env
    d.w(0x30, 1)
    assert d.r(0x34) == 8
    d.w(0x30, 7)
    assert d.r(0x34) == 0
    assert d.r(0x44) == 0


@pytest.mark.parametrize("size,desc", [
    (3, 0x1000),  # not a power of two
    (32, 0x1000),  # above QueueNumMax (16)
    (0, 0x1000),
    (16, 0x1008),  # misaligned descriptor table
    (16, 1 << 40),  # outside guest memory
])
def test_bad_queue_config_sets_needs_reset(env, size, desc):
    t, dev, d, irq = env
    d.negotiate(BASE_FEATURES)
    d.setup_queue(0, size, desc, 0x1400, 0x1800)
    d.w(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert d.r(0x70) & NEEDS_RESET
    assert dev.active is None
    assert d.r(0x60) & VIRTIO_MMIO_INT_CONFIG
    assert irq_count(irq) == 1
    d.w(0x70, 0)  # the driver's way out
    assert d.r(0x70) == 0


def test_device_activate_failure_sets_needs_reset(env):
    _, dev, d, _ = env
    dev.fail_activate = True
    assert d.bring_up() & NEEDS_RESET


def test_queue_registers_ignored_once_live(env):
    t, dev, d, _ = env
    d.bring_up()
    d.w(0x30, 0)
    d.w(0x38, 2)
    d.w(0x80, 0x9000)
    assert t.queue_states[0].size == 16 and t.queue_states[0].desc == 0x1000


def test_reset_stops_device_and_clears_queue_state(env):
    t, dev, d, _ = env
    d.bring_up()
    resets = dev.resets
    t.interrupt.signal_used_queue()
    d.w(0x50, 0)
    d.w(0x70, 0)
    assert dev.resets == resets + 1 and dev.active is None
    assert d.r(0x70) == 0 and d.r(0x60) == 0
    assert t.acked_features == 0
    d.w(0x30, 0)
    assert d.r(0x44) == 0 and d.r(0x38) == 16 and d.r(0x80) == 0
    with pytest.raises(BlockingIOError):  # stale notification dropped
        os.eventfd_read(t.queue_events[0])
    assert d.bring_up() & DRIVER_OK  # and it comes back up
    assert dev.active is not None


def test_failed_stops_device(env):
    _, dev, d, _ = env
    d.bring_up()
    resets = dev.resets
    d.w(0x70, ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED)
    assert d.r(0x70) & FAILED
    assert dev.resets == resets + 1 and dev.active is None


def test_shm_registers_read_all_ones(env):
    _, _, d, _ = env
    for sel in (0, 1, 5):
        d.w(0xAC, sel)
        assert [d.r(off) for off in (0xB0, 0xB4, 0xB8, 0xBC)] == [0xFFFFFFFF] * 4


def test_config_generation_and_config_space(env):
    t, _, d, _ = env
    assert d.r(0xFC) == 0
    assert t.read(0x100, 1) == b"\x01"
    assert t.read(0x102, 2) == b"\x03\x04"
    assert t.read(0x104, 4) == bytes([5, 6, 7, 8])
    assert t.read(0x100, 8) == bytes(range(1, 9))
    assert t.read(0x10A, 4) == b"\x0b\x0c\xff\xff"  # past the end of the config
    assert t.read(0x100, 3) == b"\xff" * 3  # odd width
    t.write(0x100, b"\x99")  # read-only: ignored
    assert t.read(0x100, 1) == b"\x01"


def test_bad_register_widths_and_offsets(env):
    t, _, d, _ = env
    assert t.read(0x00, 2) == b"\xff\xff"
    assert t.read(0x01, 4) == b"\xff" * 4
    assert t.read(0x28, 4) == b"\xff" * 4  # legacy GuestPageSize: not in version 2
    d.w(0x70, ACK)
    t.write(0x70, b"\x00\x00")  # a 16-bit status write is ignored, not a reset
    assert d.r(0x70) == ACK
    t.write(0x71, b"\x00" * 4)
    assert d.r(0x70) == ACK
    d.w(0x00, 5)  # read-only register
    assert d.r(0x00) == 0x74726976


def test_mmio_notify_writes_queue_eventfd(env):
    t, _, d, _ = env
    d.w(0x50, 1)
    d.w(0x50, 1)
    assert os.eventfd_read(t.queue_events[1]) == 2
    with pytest.raises(BlockingIOError):
        os.eventfd_read(t.queue_events[0])
    d.w(0x50, 99)  # unknown queue: ignored


def test_interrupt_status_and_ack(env):
    t, _, d, irq = env
    t.interrupt.signal_used_queue()
    t.interrupt.signal_config_changed()
    assert d.r(0x60) == VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    assert irq_count(irq) == 2
    d.w(0x64, VIRTIO_MMIO_INT_VRING)
    assert d.r(0x60) == VIRTIO_MMIO_INT_CONFIG
    d.w(0x64, VIRTIO_MMIO_INT_CONFIG)
    assert d.r(0x60) == 0


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_close_resets_and_closes_eventfds():
    irq = os.eventfd(0)
    before = _fds()
    dev = RecordingDevice()
    t = MmioTransport(dev, GuestMemory.from_ranges([(0, 1 << 20)]), irq)
    assert len(_fds() - before) == 2
    MmioDriver(t).bring_up()
    t.close()
    t.close()
    assert dev.active is None
    assert _fds() <= before
    os.close(irq)


def test_device_without_version_1_is_rejected():
    class Legacy(RecordingDevice):
        def device_features(self) -> int:
            return DEVICE_BIT

    with pytest.raises(ValueError):
        MmioTransport(Legacy(), GuestMemory.from_ranges([(0, 4096)]), -1)
