"""AcpiPmDevice: the port-0x600 sleep control/status + reset register, driven the way Linux drives it."""

from __future__ import annotations

import logging
import struct

import pytest

from devices.acpi_pm import RESET_VALUE, SLP_EN, WAK_STS, AcpiPmDevice
from devices.bus_device import BusDevice
from vmm import layout
from vmm.acpi import build_acpi_tables


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def device(self) -> AcpiPmDevice:
        return AcpiPmDevice(on_poweroff=lambda: self.events.append("off"), on_reset=lambda: self.events.append("reset"))


def linux_sleep_value(slp_typ: int) -> int:
    """What acpi_hw_extended_sleep() writes to SLEEP_CONTROL_REG."""
    return ((slp_typ << 2) & 0x1C) | SLP_EN


def test_is_a_bus_device() -> None:
    assert isinstance(Recorder().device(), BusDevice)


def test_linux_poweroff_sequence_uses_the_dsdt_s5_value() -> None:
    """Take SLP_TYPa from the DSDT's \\_S5_ and replay Linux's writes: clear WAK_STS, then sleep."""
    dsdt = build_acpi_tables(1, []).tables["DSDT"][1]
    s5 = dsdt.find(b"\\_S5_\x12")
    assert s5 >= 0
    pkg = dsdt[s5 + 5:]
    assert pkg[2] == 4  # four elements
    slp_typa = pkg[4] if pkg[3] == 0x0A else pkg[3]  # BytePrefix value, or Zero/One
    rec = Recorder()
    dev = rec.device()
    dev.write(0, bytes([WAK_STS]))
    assert rec.events == []
    dev.write(0, bytes([linux_sleep_value(slp_typa)]))
    assert rec.events == ["off"]
    assert dev.poweroff_requests == 1
    # The guest now spins on WAK_STS; it must stay clear so the vCPU stays parked until the VMM stops it.
    assert dev.read(0, 1) == b"\x00"


def test_poweroff_value_is_0x34() -> None:
    rec = Recorder()
    rec.device().write(0, b"\x34")
    assert rec.events == ["off"]


def test_reset_value_resets() -> None:
    rec = Recorder()
    dev = rec.device()
    dev.write(0, bytes([RESET_VALUE]))
    assert rec.events == ["reset"]
    assert dev.reset_requests == 1


def test_fadt_points_at_this_device() -> None:
    fadt = build_acpi_tables(1, []).tables["FACP"][1]
    for off in (116, 244, 256):
        space, width, _bit_off, _access, addr = struct.unpack_from("<BBBBQ", fadt, off)
        assert (space, width, addr) == (1, 8, layout.ACPI_PM_PORT)
    assert fadt[128] == RESET_VALUE


def test_wider_write_uses_low_byte() -> None:
    rec = Recorder()
    rec.device().write(0, b"\x34\x00\x00\x00")
    assert rec.events == ["off"]


@pytest.mark.parametrize("slp_typ", [0, 1, 3, 4, 7])
def test_other_sleep_states_wake_at_once(slp_typ: int) -> None:
    rec = Recorder()
    dev = rec.device()
    dev.write(0, bytes([WAK_STS]))
    dev.write(0, bytes([linux_sleep_value(slp_typ)]))
    assert rec.events == []
    assert dev.read(0, 1) == bytes([WAK_STS])
    assert dev.read(0, 4) == bytes([WAK_STS, 0, 0, 0])
    dev.write(0, bytes([WAK_STS]))  # write 1 to clear
    assert dev.read(0, 1) == b"\x00"


def test_reads_return_zero_of_requested_size() -> None:
    dev = Recorder().device()
    for size in (1, 2, 4, 8):
        assert dev.read(0, size) == bytes(size)


def test_bad_accesses_are_ignored_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    dev = rec.device()
    with caplog.at_level(logging.DEBUG, logger="devices.acpi_pm"):
        assert dev.read(1, 1) == b"\xff"
        assert dev.read(0, 0) == b""
        assert dev.read(0, 16) == b"\xff" * 16
        dev.write(3, b"\x34")
        dev.write(0, b"")
        dev.write(0, bytes(9))
        dev.write(0, b"\x02")  # no SLP_EN, not the reset value, not WAK_STS
        dev.write(0, b"\x00")
    assert rec.events == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert len([r for r in caplog.records if "ignoring unexpected" in r.getMessage()]) == 7
