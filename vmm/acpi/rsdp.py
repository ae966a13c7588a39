"""RSDP (Root System Description Pointer), revision 2: the one structure the guest finds first.

ACPI 6.5 sec. 5.2.5.3, 36 bytes: "RSD PTR " signature, checksum over bytes 0..19 (the ACPI 1.0 part),
OEMID[6], revision 2, RSDT address (0: we only provide the XSDT), length 36, XSDT address u64, extended
checksum over all 36 bytes, 3 reserved bytes. The first checksum must be set before the extended one,
because the extended sum includes it.
"""

from __future__ import annotations

import struct

from vmm.acpi.sdt import OEM_ID, checksum

RSDP_SIZE = 36
RSDP_REVISION = 2
CHECKSUM_OFFSET = 8
EXTENDED_CHECKSUM_OFFSET = 32
_RSDP = struct.Struct("<8sB6sBIIQB3s")
assert _RSDP.size == RSDP_SIZE


def build_rsdp(xsdt_addr: int) -> bytes:
    """An RSDP pointing at the XSDT at guest-physical `xsdt_addr`."""
    if not 0 < xsdt_addr < 1 << 64:
        raise ValueError(f"XSDT address {xsdt_addr:#x} out of range")
    rsdp = bytearray(_RSDP.pack(b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, RSDP_SIZE, xsdt_addr, 0, bytes(3)))
    rsdp[CHECKSUM_OFFSET] = checksum(rsdp[:20])
    rsdp[EXTENDED_CHECKSUM_OFFSET] = checksum(rsdp)
    return bytes(rsdp)
