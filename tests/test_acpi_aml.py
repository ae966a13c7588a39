"""Golden-byte tests for the AML encoder (bytes from the iasl-verified reference note, section A)."""

from __future__ import annotations

import pytest

from vmm.acpi import aml
from vmm.acpi.dsdt import VirtioMmioWindow, com1_aml, s5_aml, virtio_mmio_aml


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- PkgLength --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "payload, encoded",
    [(0, "01"), (62, "3f"), (63, "4104"), (300, "4e12"), (5000, "8b3801")],
)
def test_pkg_length_reference_values(payload: int, encoded: str) -> None:
    assert aml.pkg_length(payload) == h(encoded)


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(encoded value, number of PkgLength bytes) as an AML interpreter reads it."""
    lead = data[0]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@pytest.mark.parametrize(
    "payload",
    [0, 1, 61, 62, 63, 64, 0xFFD, 0xFFE, 0xFFF, 0x1000, 0xFFFFD, 0xFFFFE, 0x100000, aml.PKG_LENGTH_MAX - 4],
)
def test_pkg_length_counts_its_own_bytes(payload: int) -> None:
    encoded = aml.pkg_length(payload)
    value, nbytes = decode_pkg_length(encoded)
    assert nbytes == len(encoded)
    assert value == payload + len(encoded)
    if nbytes > 1:
        assert encoded[0] & 0x30 == 0  # bits 5:4 of a multi-byte lead are reserved


def test_pkg_length_too_large() -> None:
    with pytest.raises(ValueError):
        aml.pkg_length(aml.PKG_LENGTH_MAX)
    with pytest.raises(ValueError):
        aml.pkg_length(-1)


# --- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "path, encoded",
    [
        ("_HID", b"_HID"),
        ("_SB", b"_SB_"),
        ("\\_S5_", b"\\_S5_"),
        ("\\", b"\\\x00"),
        ("^FOO", b"^FOO_"),
        ("^^FOO", b"^^FOO_"),
        ("_SB_.COM1", b"\x2e_SB_COM1"),
        ("\\_SB_.V000", b"\\\x2e_SB_V000"),
        ("\\_SB_.PCI0.S08_", b"\\\x2f\x03_SB_PCI0S08_"),
    ],
)
def test_name_string(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "_sb_", "0ABC", "ABCDE", "A.B..C", "_SB_.", "A-B", "\\^FOO"])
def test_bad_names_rejected(path: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(path)


# --- data -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "00"),
        (1, "01"),
        (2, "0a02"),
        (0xFF, "0aff"),
        (0x100, "0b0001"),
        (0xFFFF, "0bffff"),
        (0x10000, "0c00000100"),
        (0xD0000000, "0c000000d0"),
        (0x1_0000_0000, "0e0000000001000000"),
        ((1 << 64) - 1, "0effffffffffffffff"),
    ],
)
def test_integer_shortest_form(value: int, encoded: str) -> None:
    assert aml.integer(value) == h(encoded)


def test_fixed_width_integers_and_ones() -> None:
    assert aml.byte_const(5) == h("0a05")
    assert aml.word_const(5) == h("0b0500")
    assert aml.dword_const(5) == h("0c05000000")
    assert aml.qword_const(5) == h("0e0500000000000000")
    assert aml.zero() == h("00") and aml.one() == h("01") and aml.ones() == h("ff")
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            aml.integer(bad)
    with pytest.raises(ValueError):
        aml.byte_const(0x100)
    with pytest.raises(ValueError):
        aml.word_const(0x10000)
    with pytest.raises(ValueError):
        aml.dword_const(1 << 32)


def test_string() -> None:
    assert aml.string("LNRO0005") == h("0d") + b"LNRO0005\x00"
    assert aml.string("") == h("0d00")
    for bad in ("caf\u00e9", "a\x00b"):
        with pytest.raises(ValueError):
            aml.string(bad)


@pytest.mark.parametrize("eisa, encoded",
                         [("PNP0501", "0c41d00501"), ("PNP0303", "0c41d00303"), ("PNP0A03", "0c41d00a03")])
def test_eisa_id(eisa: str, encoded: str) -> None:
    assert aml.eisa_id(eisa) == h(encoded)


@pytest.mark.parametrize("bad", ["PNP501", "pnp0501", "PNP050G", "PNP05011"])
def test_bad_eisa_id(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.eisa_id(bad)


def test_package_and_buffer() -> None:
    assert aml.package(5, 0, 0, 0) == h("1207040a05000000")
    assert aml.package() == h("120200")
    assert aml.package(aml.package(1), "A") == h("120902" "12030101" "0d4100")
    assert aml.buffer(b"\x01\x02") == h("11050a020102")
    assert aml.buffer(b"") == h("110200")
    with pytest.raises(TypeError):
        aml.package(1.5)  # type: ignore[arg-type]


def test_name_scope_method_return() -> None:
    assert aml.name("_UID", 0) == h("08") + b"_UID" + h("00")
    assert aml.method("_STA", 0, False, aml.return_(0x0F)) == h("1409") + b"_STA" + h("00a40a0f")
    # Serialized, 2 args, sync level 3: flags = 2 | 1<<3 | 3<<4.
    assert aml.method("FOO", 2, True, sync_level=3)[-1] == 0x3A
    assert aml.scope("\\_SB_") == h("1006") + b"\\_SB_"
    with pytest.raises(ValueError):
        aml.method("FOO", 8, False)
    with pytest.raises(ValueError):
        aml.method("FOO", 0, False, sync_level=16)


# --- resource descriptors ---------------------------------------------------------------------

def test_descriptors() -> None:
    assert aml.memory32_fixed(0xD0000000, 0x1000) == h("860900" "01" "000000d0" "00100000")
    assert aml.memory32_fixed(0xD0000000, 0x1000, read_write=False)[3] == 0
    assert aml.io(0x3F8, 0x3F8, 0, 8) == h("4701f803f8030008")
    assert aml.interrupt([5]) == h("890600" "03" "01" "05000000")
    # Level, active-low, shared, wake: flags 0x1D; two interrupts: length 2 + 8.
    assert aml.interrupt([9, 10], edge=False, active_low=True, shared=True, wake=True) == h(
        "890a00" "1d" "02" "09000000" "0a000000"
    )
    assert aml.end_tag() == h("7900")
    for bad in (
        lambda: aml.memory32_fixed(0xFFFFF000, 0x2000),
        lambda: aml.memory32_fixed(1 << 32, 1),
        lambda: aml.io(0x10000, 0x10000, 0, 1),
        lambda: aml.io(0x64, 0x60, 1, 1),
        lambda: aml.io(0x60, 0x60, 1, 0x100),
        lambda: aml.interrupt([]),
        lambda: aml.interrupt([1 << 32]),
    ):
        with pytest.raises(ValueError):
            bad()


# --- golden objects from the reference note -----------------------------------------------------

def test_golden_virtio_mmio_device() -> None:
    expected = h(
        "5b8246042e5f53425f56303030"  # DeviceOp PkgLen(70) DualNamePrefix _SB_ V000
        "085f4849440d4c4e524f3030303500"  # Name(_HID, "LNRO0005")
        "085f55494400"  # Name(_UID, Zero)
        "085f43434101"  # Name(_CCA, One)
        "085f435253111a0a17"  # Name(_CRS, Buffer PkgLen(26) size 0x17
        "86090001000000d000100000"  # Memory32Fixed(ReadWrite, 0xD0000000, 0x1000)
        "890600030105000000"  # Interrupt(Consumer, Edge, ActiveHigh, Exclusive){5}
        "7900"  # EndTag
    )
    assert virtio_mmio_aml(0, VirtioMmioWindow(0xD0000000, 0x1000, 5)) == expected


def test_golden_s5() -> None:
    assert s5_aml() == h("085c5f53355f1207040a05000000")


def test_golden_com1_hid_and_crs() -> None:
    com1 = com1_aml()
    hid = h("085f484944") + h("0c41d00501")
    crs = h("085f435253") + h("11160a138906000301040000004701f803f803000879 00".replace(" ", ""))
    assert hid in com1
    assert crs in com1
    # DeviceOp, PkgLength 0x42 (64 payload bytes + 2), DualNamePrefix _SB_ COM1.
    assert com1.startswith(h("5b824204" "2e5f53425f434f4d31"))
    assert len(com1) == 2 + 2 + 64
