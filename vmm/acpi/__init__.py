"""ACPI tables for the guest: RSDP -> XSDT -> {FADT -> DSDT, MADT}.

The VMM calls `build_acpi_tables(vcpus, virtio_devices)` and writes the result into guest memory with
`AcpiTables.write_to(memory)`; the zero page's `acpi_rsdp_addr` gets `AcpiTables.rsdp_addr`.

Placement: everything lives in [layout.ACPI_TABLES_ADDR, layout.ACPI_TABLES_END) = [0xE0000,
0x100000), the legacy BIOS area. The RSDP sits at layout.RSDP_ADDR = 0xE0000 (where Linux also finds
it by scanning, even without acpi_rsdp_addr), the tables follow it, 16-byte aligned. Keeping clear of
[0x9FC00, 0xA0000) leaves the EBDA / MP-table area to the VMM. The VMM must mark the range reserved
in the e820 map (Linux never uses 640K-1M as RAM anyway, but saying so keeps the tables safe from any
reading of the map).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from devices.memory import GuestMemoryAccess
from vmm import layout
from vmm.acpi.dsdt import VirtioMmioWindow, build_dsdt
from vmm.acpi.fadt import build_fadt
from vmm.acpi.madt import MAX_VCPUS, build_madt
from vmm.acpi.rsdp import RSDP_SIZE, build_rsdp
from vmm.acpi.xsdt import build_xsdt

logger = logging.getLogger(__name__)

TABLE_ALIGN = 16

__all__ = [
    "AcpiTables",
    "TableArena",
    "build_acpi_tables",
]


@dataclass(frozen=True)
class AcpiTables:
    """The encoded tables and where each one goes in guest-physical memory."""

    blobs: list[tuple[int, bytes]]
    rsdp_addr: int
    # Signature ("RSD PTR ", "DSDT", "FACP", "APIC", "XSDT") -> (gpa, bytes), for logs and tests.
    tables: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def write_to(self, memory: GuestMemoryAccess) -> None:
        """Copy every table into guest memory (raises the memory's ValueError if the area is not RAM)."""
        for gpa, data in self.blobs:
            memory.write(gpa, data)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class TableArena:
    """First-fit placement of tables in [start, end), each aligned to TABLE_ALIGN."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self._cursor = _align_up(start, TABLE_ALIGN)
        self.tables: dict[str, tuple[int, bytes]] = {}

    def place(self, signature: str, data: bytes) -> int:
        """Reserve room for `data` and return its guest-physical address; ValueError if it does not fit."""
        addr = self._cursor
        if addr + len(data) > self.end:
            raise ValueError(
                f"ACPI tables do not fit in [{self.start:#x}, {self.end:#x}): "
                f"{signature} ({len(data)} bytes) would end at {addr + len(data):#x}"
            )
        self.tables[signature] = (addr, data)
        self._cursor = _align_up(addr + len(data), TABLE_ALIGN)
        return addr


def build_acpi_tables(
    vcpus: int, virtio_devices: list[tuple[int, int, int]], *, i8042: bool = True
) -> AcpiTables:
    """Build the guest's ACPI tables.

    `vcpus`: 1..255. `virtio_devices`: (mmio_base, mmio_size, gsi) per virtio-mmio transport, in the
    order the devices should be named (_SB_.V000, V001, ...). `i8042`: describe the keyboard
    controller (PNP0303 + FADT 8042 bit); with False Linux skips its i8042 probe entirely, which
    only makes sense while the VMM's i8042 does nothing but reset (see vmm/acpi/fadt.py).
    Raises ValueError for bad input or tables that do not fit the area.
    """
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be an integer in 1..{MAX_VCPUS}, got {vcpus!r}")
    windows = []
    for i, dev in enumerate(virtio_devices):
        try:
            base, size, gsi = dev
        except (TypeError, ValueError):
            raise ValueError(f"virtio device {i}: expected (mmio_base, mmio_size, gsi), got {dev!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (base, size, gsi)):
            raise ValueError(f"virtio device {i}: expected integers, got {dev!r}")
        windows.append(VirtioMmioWindow(base, size, gsi))

    arena = TableArena(_align_up(layout.RSDP_ADDR + RSDP_SIZE, TABLE_ALIGN), layout.ACPI_TABLES_END)
    dsdt_addr = arena.place("DSDT", build_dsdt(windows, i8042=i8042))
    fadt_addr = arena.place("FACP", build_fadt(dsdt_addr, i8042=i8042))
    madt_addr = arena.place("APIC", build_madt(vcpus))
    xsdt_addr = arena.place("XSDT", build_xsdt([fadt_addr, madt_addr]))
    tables = dict(arena.tables)
    tables["RSD PTR "] = (layout.RSDP_ADDR, build_rsdp(xsdt_addr))

    blobs = sorted(tables.values())
    by_addr = sorted(tables.items(), key=lambda kv: kv[1][0])
    logger.debug("ACPI tables: %s", ", ".join(f"{sig.strip()}@{addr:#x}+{len(data)}" for sig, (addr, data) in by_addr))
    return AcpiTables(blobs=blobs, rsdp_addr=layout.RSDP_ADDR, tables=tables)
