"""MADT ("APIC"), revision 6 (ACPI 6.5 sec. 5.2.12): the interrupt controllers KVM's in-kernel irqchip provides.

Body: local APIC address u32 (0xFEE00000), flags u32, then entries: one I/O APIC (id 0 at 0xFEC00000,
GSI base 0; KVM's has 24 pins) and one Processor Local APIC per vCPU (ACPI uid = APIC id = index,
enabled).

Like Firecracker we emit neither an Interrupt Source Override nor a Local APIC NMI entry by default:
- ISO IRQ0 -> GSI2 only matters for the PIT, and a HW-reduced guest never sets up the PIT or the 8259
  (Linux's `acpi_generic_reduced_hw_init`); ISOs also only apply to legacy `IRQ()` descriptors, and our
  DSDT uses Extended Interrupt descriptors that carry trigger/polarity themselves.
- Linux programs LINT1 as NMI on the boot CPU itself (`setup_local_APIC`), and the VMM sets LVT1 = NMI.
Both are available as keyword options (QEMU's encodings) in case a guest turns out to need them.
Flags stay 0 (no PCAT_COMPAT): there is no dual-8259 setup for the guest to disable.
"""

from __future__ import annotations

import struct

from vmm import layout
from vmm.acpi.sdt import build_sdt

MADT_REVISION = 6
IOAPIC_ID = 0
IOAPIC_GSI_BASE = 0
MAX_VCPUS = 255  # APIC ids 0..254 in xAPIC mode (0xFF is broadcast)

TYPE_LOCAL_APIC = 0
TYPE_IO_APIC = 1
TYPE_INTERRUPT_SOURCE_OVERRIDE = 2
TYPE_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENABLED = 1

LOCAL_APIC = struct.Struct("<BBBBI")  # type, length 8, ACPI processor uid, APIC id, flags
IO_APIC = struct.Struct("<BBBBII")  # type, length 12, id, reserved, address, GSI base
INTERRUPT_SOURCE_OVERRIDE = struct.Struct("<BBBBIH")  # type, length 10, bus, source, GSI, flags
LOCAL_APIC_NMI = struct.Struct("<BBBHB")  # type, length 6, uid (0xFF = all), flags, LINT#


def build_madt(vcpus: int, *, irq0_override: bool = False, lapic_nmi: bool = False) -> bytes:
    """A MADT for `vcpus` CPUs (1..255) and KVM's single I/O APIC."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be in 1..{MAX_VCPUS}, got {vcpus}")
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, 0))
    body += IO_APIC.pack(TYPE_IO_APIC, IO_APIC.size, IOAPIC_ID, 0, layout.IOAPIC_ADDR, IOAPIC_GSI_BASE)
    if irq0_override:
        # ISA bus 0, IRQ 0 -> GSI 2, flags 0 = conforms to the bus (edge, active high).
        body += INTERRUPT_SOURCE_OVERRIDE.pack(TYPE_INTERRUPT_SOURCE_OVERRIDE, INTERRUPT_SOURCE_OVERRIDE.size,
                                               0, 0, 2, 0)
    for cpu in range(vcpus):
        body += LOCAL_APIC.pack(TYPE_LOCAL_APIC, LOCAL_APIC.size, cpu, cpu, LOCAL_APIC_ENABLED)
    if lapic_nmi:
        body += LOCAL_APIC_NMI.pack(TYPE_LOCAL_APIC_NMI, LOCAL_APIC_NMI.size, 0xFF, 0, 1)
    return build_sdt(b"APIC", MADT_REVISION, b"PYVMAPIC", bytes(body))
