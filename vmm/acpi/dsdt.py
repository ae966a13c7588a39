"""DSDT: the AML namespace the guest enumerates devices from.

Contents (shapes follow Firecracker's DSDT, see the x86-boot-and-acpi reference note):
- `\\_S5_` Package{5, 0, 0, 0}: the soft-off sleep type the AcpiPmDevice recognises. Together with the
  FADT sleep registers this is what makes Linux register ACPI power-off in HW-reduced mode.
- `_SB_.COM1`: the 16550 at 0x3F8, IRQ 4 (PNP0501).
- `_SB_.PS2_`: the i8042 at 0x60/0x64, IRQ 1 (PNP0303); optional, see vmm/acpi/fadt.py.
- `_SB_.Vnnn`: one LNRO0005 (virtio-mmio) device per window, with an edge-triggered, active-high,
  exclusive Extended Interrupt: the VMM signals it through an irqfd, which is an edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from devices.acpi_pm import S5_SLP_TYP
from vmm import layout
from vmm.acpi import aml
from vmm.acpi.sdt import build_sdt

DSDT_REVISION = 2  # >= 2: AML integers are 64-bit
MAX_VIRTIO_DEVICES = 1000  # names V000..V999

# GSIs a virtio device must not take: 0/2 are wired to the PIT by KVM, the i8042's and COM1's are
# described below.
RESERVED_GSIS = {0: "PIT", layout.I8042_IRQ: "i8042", 2: "PIT (IOAPIC pin 2)", layout.COM1_IRQ: "COM1"}


@dataclass(frozen=True)
class VirtioMmioWindow:
    """One virtio-mmio transport as the guest should see it."""

    base: int
    size: int
    gsi: int


def validate_virtio_windows(windows: list[VirtioMmioWindow]) -> None:
    """Raise ValueError for windows that cannot be described or that collide with each other."""
    if len(windows) > MAX_VIRTIO_DEVICES:
        raise ValueError(f"{len(windows)} virtio devices (max {MAX_VIRTIO_DEVICES})")
    seen_gsis: dict[int, int] = {}
    for i, w in enumerate(windows):
        if w.size <= 0 or w.base < 0 or w.base + w.size > 1 << 32:
            raise ValueError(f"virtio device {i}: window {w.base:#x}+{w.size:#x} is not a non-empty range below 4 GiB")
        if not 0 <= w.gsi < layout.IOAPIC_PINS:
            raise ValueError(f"virtio device {i}: GSI {w.gsi} is not an I/O APIC pin (0..{layout.IOAPIC_PINS - 1})")
        if w.gsi in RESERVED_GSIS:
            raise ValueError(f"virtio device {i}: GSI {w.gsi} is used by the {RESERVED_GSIS[w.gsi]}")
        if w.gsi in seen_gsis:
            raise ValueError(f"virtio devices {seen_gsis[w.gsi]} and {i} share GSI {w.gsi} (declared exclusive)")
        seen_gsis[w.gsi] = i
    ordered = sorted(range(len(windows)), key=lambda k: windows[k].base)
    for a, b in zip(ordered, ordered[1:]):
        if windows[a].base + windows[a].size > windows[b].base:
            raise ValueError(f"virtio devices {a} and {b} have overlapping MMIO windows")


def s5_aml() -> bytes:
    return aml.name("\\_S5_", aml.package(S5_SLP_TYP, 0, 0, 0))


def com1_aml() -> bytes:
    return aml.device(
        "_SB_.COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", 0),
        aml.name("_DDN", "COM1"),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.interrupt([layout.COM1_IRQ]),
                aml.io(layout.COM1_PORT, layout.COM1_PORT, 0, layout.COM1_PORT_SIZE),
            ),
        ),
    )


def ps2_aml() -> bytes:
    return aml.device(
        "_SB_.PS2_",
        aml.name("_HID", aml.eisa_id("PNP0303")),
        aml.method("_STA", 0, False, aml.return_(0x0F)),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.io(layout.I8042_DATA_PORT, layout.I8042_DATA_PORT, 1, 1),
                aml.io(layout.I8042_CMD_PORT, layout.I8042_CMD_PORT, 1, 1),
                aml.interrupt([layout.I8042_IRQ]),
            ),
        ),
    )


def virtio_mmio_aml(index: int, window: VirtioMmioWindow) -> bytes:
    """Device(_SB_.Vnnn) for virtio-mmio: Linux's virtio_mmio driver matches _HID LNRO0005."""
    return aml.device(
        f"_SB_.V{index:03d}",
        aml.name("_HID", "LNRO0005"),
        aml.name("_UID", index),
        aml.name("_CCA", 1),  # cache-coherent DMA
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.memory32_fixed(window.base, window.size, read_write=True),
                aml.interrupt([window.gsi], consumer=True, edge=True, active_low=False, shared=False),
            ),
        ),
    )


def build_dsdt(windows: list[VirtioMmioWindow], *, i8042: bool = True) -> bytes:
    """The DSDT; `i8042=False` leaves out PS2_ so Linux does not probe the keyboard controller."""
    validate_virtio_windows(windows)
    body = s5_aml() + com1_aml() + (ps2_aml() if i8042 else b"")
    body += b"".join(virtio_mmio_aml(i, w) for i, w in enumerate(windows))
    return build_sdt(b"DSDT", DSDT_REVISION, b"PYVMDSDT", body)
