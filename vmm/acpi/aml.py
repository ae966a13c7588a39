"""A small AML (ACPI Machine Language) encoder: just the terms our DSDT needs.

Every function returns the encoded bytes of one AML term, so a table body is plain concatenation and
a golden-byte test can compare any piece on its own. Encodings follow ACPI 6.5 chapter 20 ("ACPI
Machine Language Specification") and chapter 6.4 (resource descriptors).

Arguments that are AML objects (the value of a `Name`, a `Package` element, a `Return` value) accept
an `int` (encoded with `integer`), a `str` (encoded with `string`) or `bytes` that are already
encoded AML.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

AmlValue = int | str | bytes

# Opcodes (ACPI 6.5 sec. 20.3).
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX

ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

# Resource descriptor tags (ACPI 6.5 sec. 6.4).
IO_DESCRIPTOR = 0x47  # small item, type 0x08, length 7
END_TAG = 0x79  # small item, type 0x0F, length 1
MEMORY32_FIXED_DESCRIPTOR = 0x86  # large item, type 0x06
EXTENDED_INTERRUPT_DESCRIPTOR = 0x89  # large item, type 0x09

# PkgLength can describe at most 28 bits (lead nibble + three extra bytes).
PKG_LENGTH_MAX = (1 << 28) - 1

_NAME_SEG_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


# --- package length ---------------------------------------------------------------------------

def pkg_length(payload_len: int) -> bytes:
    """Encode a PkgLength for `payload_len` bytes that follow it.

    The encoded value counts the PkgLength bytes themselves, which is why the size of the encoding
    has to be chosen before the value is known: one byte covers totals up to 63; otherwise bits 7:6 of
    the lead byte give the number of extra bytes (1-3), bits 3:0 hold the low nibble and each extra
    byte carries the next 8 bits.
    """
    if payload_len < 0:
        raise ValueError(f"negative package length {payload_len}")
    if payload_len + 1 <= 0x3F:
        return bytes([payload_len + 1])
    for extra in (1, 2, 3):
        total = payload_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise ValueError(f"package length {payload_len} does not fit in a PkgLength (max {PKG_LENGTH_MAX})")


def _with_pkg_length(opcode: bytes, payload: bytes) -> bytes:
    return opcode + pkg_length(len(payload)) + payload


# --- names ------------------------------------------------------------------------------------

def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does (`_SB` -> `_SB_`)."""
    if not _NAME_SEG_RE.match(seg):
        raise ValueError(f"invalid ACPI name segment {seg!r} (1-4 chars of A-Z 0-9 _, not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """Encode an ASL-style name path: `\\_S5_`, `_SB_.COM1`, `^PCI0.FOO`, `\\`.

    A leading `\\` selects the root, each `^` one parent scope. Segments are joined by `.`; two use the
    DualNamePrefix, three or more the MultiNamePrefix with a count, none the NullName.
    """
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix = bytes([ROOT_CHAR])
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            prefix += bytes([PARENT_PREFIX_CHAR])
            rest = rest[1:]
    if rest == "":
        if not prefix:
            raise ValueError("empty ACPI name path")
        return prefix + bytes([NULL_NAME])
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"ACPI name path with {len(segs)} segments (max 255)")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# --- data objects -----------------------------------------------------------------------------

def zero() -> bytes:
    return bytes([ZERO_OP])


def one() -> bytes:
    return bytes([ONE_OP])


def ones() -> bytes:
    """All bits set (0xFFFFFFFFFFFFFFFF in a revision >= 2 definition block)."""
    return bytes([ONES_OP])


def _checked(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value:#x} out of range for {bits} bits")
    return value


def byte_const(value: int) -> bytes:
    return bytes([BYTE_PREFIX, _checked(value, 8, "ByteConst")])


def word_const(value: int) -> bytes:
    return bytes([WORD_PREFIX]) + struct.pack("<H", _checked(value, 16, "WordConst"))


def dword_const(value: int) -> bytes:
    return bytes([DWORD_PREFIX]) + struct.pack("<I", _checked(value, 32, "DWordConst"))


def qword_const(value: int) -> bytes:
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", _checked(value, 64, "QWordConst"))


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned integer (Zero/One, then Byte/Word/DWord/QWord), as iasl emits."""
    _checked(value, 64, "integer")
    if value == 0:
        return zero()
    if value == 1:
        return one()
    if value <= 0xFF:
        return byte_const(value)
    if value <= 0xFFFF:
        return word_const(value)
    if value <= 0xFFFFFFFF:
        return dword_const(value)
    return qword_const(value)


def string(text: str) -> bytes:
    """A String: ASCII characters 0x01-0x7F followed by a NUL."""
    if not text.isascii() or "\x00" in text:
        raise ValueError(f"AML strings must be ASCII without NUL: {text!r}")
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0501"): 3 upper-case letters (5 bits each, 'A'=1) and 4 hex digits, stored big-endian.

    It is always a DWordConst, whatever its value, because that is what ASL's EISAID() produces.
    """
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise ValueError(f"invalid EISA id {text!r} (want e.g. 'PNP0501')")
    c1, c2, c3 = (ord(c) - 0x40 for c in text[:3])
    value = (c1 << 26) | (c2 << 21) | (c3 << 16) | int(text[3:], 16)
    return bytes([DWORD_PREFIX]) + value.to_bytes(4, "big")


def _obj(value: AmlValue) -> bytes:
    """Turn a Python value into an AML data object (see the module docstring)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, int):
        return integer(int(value))
    if isinstance(value, str):
        return string(value)
    raise TypeError(f"cannot encode {type(value).__name__} as AML")


def package(*elements: AmlValue) -> bytes:
    """Package(){...}: PackageOp PkgLength NumElements (u8) elements."""
    if len(elements) > 255:
        raise ValueError(f"Package with {len(elements)} elements (max 255; VarPackage not supported)")
    payload = bytes([len(elements)]) + b"".join(_obj(e) for e in elements)
    return _with_pkg_length(bytes([PACKAGE_OP]), payload)


def buffer(data: bytes) -> bytes:
    """Buffer(){...}: BufferOp PkgLength BufferSize(integer) bytes."""
    payload = integer(len(data)) + bytes(data)
    return _with_pkg_length(bytes([BUFFER_OP]), payload)


# --- named objects and code -------------------------------------------------------------------

def name(path: str, value: AmlValue) -> bytes:
    """Name(path, value)."""
    return bytes([NAME_OP]) + name_string(path) + _obj(value)


def scope(path: str, *terms: bytes) -> bytes:
    """Scope(path){terms}."""
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """Device(path){terms}."""
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(path: str, argc: int, serialized: bool, *terms: bytes, sync_level: int = 0) -> bytes:
    """Method(path, argc, Serialized|NotSerialized, sync_level){terms}.

    MethodFlags: bits 2:0 argument count (0-7), bit 3 serialized, bits 7:4 sync level (0-15).
    """
    if not 0 <= argc <= 7:
        raise ValueError(f"method argument count {argc} out of range 0..7")
    if not 0 <= sync_level <= 15:
        raise ValueError(f"method sync level {sync_level} out of range 0..15")
    flags = argc | (int(bool(serialized)) << 3) | (sync_level << 4)
    return _with_pkg_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: AmlValue) -> bytes:
    """Return(value)."""
    return bytes([RETURN_OP]) + _obj(value)


# --- resource templates -----------------------------------------------------------------------

def memory32_fixed(base: int, length: int, read_write: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length): large item 0x86, 9 data bytes."""
    _checked(base, 32, "Memory32Fixed base")
    _checked(length, 32, "Memory32Fixed length")
    if base + length > 1 << 32:
        raise ValueError(f"Memory32Fixed window {base:#x}+{length:#x} crosses 4 GiB")
    return bytes([MEMORY32_FIXED_DESCRIPTOR]) + struct.pack("<HBII", 9, int(bool(read_write)), base, length)


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO(Decode16|Decode10, min, max, alignment, length): small item 0x47, 7 data bytes."""
    _checked(minimum, 16, "IO minimum")
    _checked(maximum, 16, "IO maximum")
    _checked(alignment, 8, "IO alignment")
    _checked(length, 8, "IO length")
    if maximum < minimum:
        raise ValueError(f"IO maximum {maximum:#x} below minimum {minimum:#x}")
    return struct.pack("<BBHHBB", IO_DESCRIPTOR, int(bool(decode16)), minimum, maximum, alignment, length)


def interrupt(
    irqs: Iterable[int],
    *,
    consumer: bool = True,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
    wake: bool = False,
) -> bytes:
    """Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive){irqs}: Extended Interrupt, large item 0x89.

    Flags: bit0 consumer, bit1 edge-triggered, bit2 active-low, bit3 shared, bit4 wake capable.
    Linux takes trigger and polarity from these flags directly (MADT overrides do not apply).
    """
    irq_list = [_checked(i, 32, "interrupt number") for i in irqs]
    if not 1 <= len(irq_list) <= 255:
        raise ValueError(f"Extended Interrupt needs 1..255 interrupts, got {len(irq_list)}")
    flags = (
        int(consumer)
        | (int(edge) << 1)
        | (int(active_low) << 2)
        | (int(shared) << 3)
        | (int(wake) << 4)
    )
    data = struct.pack("<BB", flags, len(irq_list)) + b"".join(struct.pack("<I", i) for i in irq_list)
    return struct.pack("<BH", EXTENDED_INTERRUPT_DESCRIPTOR, len(data)) + data


def end_tag() -> bytes:
    """End tag; a checksum byte of 0 means "treat as valid" (what iasl emits)."""
    return bytes([END_TAG, 0x00])


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){descriptors}: a Buffer holding the descriptors and an end tag."""
    return buffer(b"".join(descriptors) + end_tag())
