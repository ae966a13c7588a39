"""The 36-byte System Description Table header shared by every ACPI table except the RSDP.

ACPI 6.5 sec. 5.2.6: signature[4], length u32, revision u8, checksum u8, OEMID[6], OEM table id[8],
OEM revision u32, creator id[4], creator revision u32. The checksum byte (offset 9) makes the 8-bit
sum of the whole table zero; it is computed last, over the final bytes, so no caller can forget it.
"""

from __future__ import annotations

import struct

OEM_ID = b"PYVMM "
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1

HEADER_SIZE = 36
LENGTH_OFFSET = 4
CHECKSUM_OFFSET = 9
_HEADER = struct.Struct("<4sIBB6s8sI4sI")
assert _HEADER.size == HEADER_SIZE


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes the 8-bit sum of `data` (with that byte added) zero."""
    return (-sum(data)) & 0xFF


def _fixed(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size or not value.isascii():
        raise ValueError(f"{what} must be {size} ASCII bytes, got {value!r}")
    return value


def build_sdt(signature: bytes, revision: int, oem_table_id: bytes, body: bytes) -> bytes:
    """Header + body with the length and checksum filled in."""
    _fixed(signature, 4, "signature")
    _fixed(oem_table_id, 8, "OEM table id")
    length = HEADER_SIZE + len(body)
    header = _HEADER.pack(
        signature, length, revision, 0, OEM_ID, oem_table_id, OEM_REVISION, CREATOR_ID, CREATOR_REVISION
    )
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)
