"""FADT ("FACP"), revision 6 (ACPI 6.5 sec. 5.2.9): 276 bytes describing a hardware-reduced platform.

HW_REDUCED_ACPI tells Linux there are no PM1/GPE blocks, no SCI, no 8259 PIC and no PIT to set up
(arch/x86/kernel/acpi/boot.c `acpi_generic_reduced_hw_init`), so the only registers we describe are
the sleep control/status pair and the reset register, all on the AcpiPmDevice port
(layout.ACPI_PM_PORT).

IAPC_BOOT_ARCH (offset 109) choices:
- bit 1 (8042) set: the VMM has an i8042 at 0x60/0x64 (for the reboot=k reset) and the DSDT describes
  it as PNP0303. With the PNP device present Linux's i8042 driver probes the controller whatever this
  bit says (i8042_pnp_init finds it); the bit only matters without the PNP device, where a clear bit
  makes Linux treat the controller as absent. Setting it keeps the FADT and the DSDT consistent.
  With `i8042=False` (no PS2_ in the DSDT) the bit is clear and Linux >= 4.10 does not probe at all
  ("PNP: No PS/2 controller found"), which avoids a ~0.5 s CTR-read timeout against a controller
  stub that only implements the reset command; reboot=k still works (it writes port 0x64 directly).
- bit 2 (VGA not present) set: there is no VGA; Linux must not probe for one.
- bit 5 (CMOS RTC not present) set: the VMM has no RTC at 0x70/0x71, so Linux should not register the
  rtc_cmos platform device (the wall clock comes from kvmclock).
- bit 0 (LEGACY_DEVICES) clear: no ISA devices beyond those the DSDT enumerates (disables PnP BIOS).
"""

from __future__ import annotations

import struct

from devices.acpi_pm import RESET_VALUE
from vmm import layout
from vmm.acpi.sdt import build_sdt

FADT_SIZE = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
HYPERVISOR_VENDOR_ID = b"PYVMM   "

# Field offsets (from the start of the table).
DSDT_OFFSET = 40
IAPC_BOOT_ARCH_OFFSET = 109
FLAGS_OFFSET = 112
RESET_REG_OFFSET = 116
RESET_VALUE_OFFSET = 128
MINOR_REVISION_OFFSET = 131
X_DSDT_OFFSET = 140
SLEEP_CONTROL_REG_OFFSET = 244
SLEEP_STATUS_REG_OFFSET = 256
HYPERVISOR_VENDOR_ID_OFFSET = 268

# IAPC_BOOT_ARCH bits.
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
IAPC_BOOT_ARCH = IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT
IAPC_BOOT_ARCH_NO_8042 = IAPC_BOOT_ARCH & ~IAPC_8042

# Flags bits.
FLAG_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FLAG_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20
FLAGS = FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP | FLAG_HW_REDUCED_ACPI

# Generic Address Structure (ACPI 6.5 sec. 5.2.3.2): space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
GAS_SPACE_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1


def gas_io8(port: int) -> bytes:
    """A GAS for an 8-bit register at I/O `port`, accessed bytewise."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"I/O port {port:#x} out of range")
    return GAS.pack(GAS_SPACE_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


def build_fadt(dsdt_addr: int, *, i8042: bool = True) -> bytes:
    """A revision-6 FADT whose X_DSDT points at `dsdt_addr` (the 32-bit DSDT field stays 0).

    `i8042=False` clears the 8042 boot-architecture bit (use it together with a DSDT without PS2_).
    """
    if not 0 < dsdt_addr < 1 << 64:
        raise ValueError(f"DSDT address {dsdt_addr:#x} out of range")
    table = bytearray(FADT_SIZE)
    struct.pack_into("<H", table, IAPC_BOOT_ARCH_OFFSET, IAPC_BOOT_ARCH if i8042 else IAPC_BOOT_ARCH_NO_8042)
    struct.pack_into("<I", table, FLAGS_OFFSET, FLAGS)
    table[RESET_REG_OFFSET:RESET_REG_OFFSET + GAS.size] = gas_io8(layout.ACPI_PM_PORT)
    table[RESET_VALUE_OFFSET] = RESET_VALUE
    table[MINOR_REVISION_OFFSET] = FADT_MINOR_REVISION
    struct.pack_into("<Q", table, X_DSDT_OFFSET, dsdt_addr)
    table[SLEEP_CONTROL_REG_OFFSET:SLEEP_CONTROL_REG_OFFSET + GAS.size] = gas_io8(layout.ACPI_PM_PORT)
    table[SLEEP_STATUS_REG_OFFSET:SLEEP_STATUS_REG_OFFSET + GAS.size] = gas_io8(layout.ACPI_PM_PORT)
    table[HYPERVISOR_VENDOR_ID_OFFSET:HYPERVISOR_VENDOR_ID_OFFSET + 8] = HYPERVISOR_VENDOR_ID
    fadt = build_sdt(b"FACP", FADT_REVISION, b"PYVMFACP", bytes(table[36:]))
    assert len(fadt) == FADT_SIZE
    return fadt
