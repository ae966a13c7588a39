"""The guest address map: every region fits the room it is given, and devices span what they say."""

from __future__ import annotations

import pytest

from devices import acpi_pm, i8042, serial
from devices.virtio import mmio
from vmm import layout
from vmm.config import Config, VmConfig
from vmm.machine import Machine


def test_layout_constants_are_consistent():
    assert layout.PAGE_TABLES_END <= layout.CMDLINE_ADDR
    assert layout.ZERO_PAGE_ADDR + layout.ZERO_PAGE_SIZE <= layout.BOOT_STACK_POINTER + 0x10
    assert layout.GDT_ADDR + layout.GDT_ENTRIES * 8 <= layout.IDT_ADDR
    assert layout.CMDLINE_ADDR + layout.CMDLINE_MAX_SIZE <= layout.EBDA_START
    assert layout.MMIO_HOLE_START <= layout.VIRTIO_MMIO_BASE < layout.IOAPIC_ADDR < layout.LAPIC_ADDR
    assert layout.virtio_mmio_addr(1) == 0xD0001000 and layout.virtio_gsi(0) == 5
    assert layout.VIRTIO_FIRST_GSI + layout.VIRTIO_MAX_DEVICES <= layout.IOAPIC_PINS
    assert layout.TSS_ADDR + 3 * 0x1000 <= layout.MMIO_HOLE_END
    with pytest.raises(ValueError):
        layout.virtio_mmio_addr(layout.VIRTIO_MAX_DEVICES)


def test_low_memory_regions_do_not_overlap():
    assert layout.PAGE_TABLES_END == layout.PD_ADDR + layout.IDENTITY_MAP_GIB * 0x1000
    assert layout.EBDA_START <= layout.ACPI_TABLES_ADDR == layout.RSDP_ADDR
    assert layout.ACPI_TABLES_END <= layout.HIGH_MEMORY_START <= layout.KERNEL_LOAD_ADDR


def test_device_ranges_come_from_the_devices():
    # The map names each device's span; the device defines it, so they cannot disagree.
    assert layout.COM1_PORT_SIZE == serial.IO_SIZE == 8
    assert layout.I8042_CMD_PORT == layout.I8042_DATA_PORT + i8042.COMMAND_PORT_OFFSET == 0x64
    assert layout.I8042_DATA_PORT + layout.I8042_PORT_SIZE - 1 == layout.I8042_CMD_PORT
    assert layout.ACPI_PM_PORT_SIZE == acpi_pm.IO_SIZE == 1
    assert layout.VIRTIO_MMIO_SIZE == mmio.MmioTransport.size <= layout.VIRTIO_MMIO_STRIDE
    ports = sorted([(layout.COM1_PORT, layout.COM1_PORT_SIZE), (layout.I8042_DATA_PORT, layout.I8042_PORT_SIZE),
                    (layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_SIZE)])
    assert all(a + n <= b for (a, n), (b, _) in zip(ports, ports[1:]))


@pytest.mark.parametrize("discovery, announced", [("cmdline", True), ("acpi", False), ("both", True)])
def test_cmdline_announces_the_layout_windows(discovery, announced):
    m = Machine(Config(vm=VmConfig(discovery=discovery)))
    devices = [(layout.virtio_mmio_addr(i), layout.virtio_gsi(i)) for i in range(2)]
    line = m.build_cmdline(devices, acpi=discovery != "cmdline")
    expected = "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    assert (expected in line) is announced
