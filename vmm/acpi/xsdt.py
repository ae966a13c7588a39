"""XSDT (Extended System Description Table): the list of 64-bit table addresses the RSDP points to.

It lists the FADT and the MADT; the DSDT is reached through the FADT's X_DSDT, never through the XSDT.
"""

from __future__ import annotations

import struct

from vmm.acpi.sdt import build_sdt

XSDT_REVISION = 1


def build_xsdt(table_addrs: list[int]) -> bytes:
    """An XSDT whose entries are the guest-physical addresses `table_addrs`, in order."""
    for addr in table_addrs:
        if not 0 < addr < 1 << 64:
            raise ValueError(f"table address {addr:#x} out of range")
    body = b"".join(struct.pack("<Q", addr) for addr in table_addrs)
    return build_sdt(b"XSDT", XSDT_REVISION, b"PYVMXSDT", body)
