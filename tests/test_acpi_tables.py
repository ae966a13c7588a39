"""Structure tests for the ACPI tables: checksums, lengths, field offsets, placement and input checks."""

from __future__ import annotations

import struct

import pytest

from devices.acpi_pm import RESET_VALUE
from vmm import layout
from vmm.acpi import (
    TableArena,
    build_acpi_tables,
)
from vmm.acpi import fadt as fadt_mod
from vmm.acpi.madt import build_madt
from vmm.acpi.sdt import HEADER_SIZE
from vmm.memory import GuestMemory

VIRTIO = [(0xD0000000 + i * 0x1000, 0x1000, 5 + i) for i in range(3)]
SDT_SIGNATURES = ["DSDT", "FACP", "APIC", "XSDT"]


def sdt_header(table: bytes) -> tuple:
    return struct.unpack_from("<4sIBB6s8sI4sI", table, 0)


@pytest.fixture(scope="module")
def tables():
    return build_acpi_tables(4, VIRTIO)


@pytest.mark.parametrize("sig", SDT_SIGNATURES)
def test_sdt_checksum_and_length(tables, sig: str) -> None:
    _, table = tables.tables[sig]
    signature, length, _rev, _csum, oem_id, _tid, _orev, creator, _crev = sdt_header(table)
    assert signature == sig.encode()
    assert length == len(table)
    assert sum(table) & 0xFF == 0
    assert oem_id == b"PYVMM "
    assert creator == b"PYVM"


def test_rsdp(tables) -> None:
    addr, rsdp = tables.tables["RSD PTR "]
    assert addr == layout.RSDP_ADDR == tables.rsdp_addr == 0xE0000
    sig, _csum, oem, rev, rsdt, length, xsdt, _ext, reserved = struct.unpack("<8sB6sBIIQB3s", rsdp)
    assert (sig, oem, rev, rsdt, length, reserved) == (b"RSD PTR ", b"PYVMM ", 2, 0, 36, bytes(3))
    assert sum(rsdp[:20]) & 0xFF == 0
    assert sum(rsdp) & 0xFF == 0
    assert xsdt == tables.tables["XSDT"][0]


def test_xsdt_lists_fadt_then_madt(tables) -> None:
    _, xsdt = tables.tables["XSDT"]
    entries = struct.unpack_from("<2Q", xsdt, HEADER_SIZE)
    assert len(xsdt) == HEADER_SIZE + 16
    assert entries == (tables.tables["FACP"][0], tables.tables["APIC"][0])


def test_fadt_fields(tables) -> None:
    _, fadt = tables.tables["FACP"]
    assert len(fadt) == 276
    assert fadt[8] == 6  # revision
    assert fadt[131] == 5  # minor revision
    dsdt32, = struct.unpack_from("<I", fadt, 40)
    x_dsdt, = struct.unpack_from("<Q", fadt, 140)
    assert dsdt32 == 0
    assert x_dsdt == tables.tables["DSDT"][0]
    flags, = struct.unpack_from("<I", fadt, 112)
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    boot_arch, = struct.unpack_from("<H", fadt, 109)
    assert boot_arch == fadt_mod.IAPC_BOOT_ARCH
    assert boot_arch & 0b10 and boot_arch & 0b100 and boot_arch & 0b100000
    io8 = (1, 8, 0, 1, layout.ACPI_PM_PORT)  # SystemIO, 8 bits, offset 0, byte access, port 0x600
    assert struct.unpack_from("<BBBBQ", fadt, 116) == io8  # RESET_REG
    assert fadt[128] == RESET_VALUE
    assert struct.unpack_from("<BBBBQ", fadt, 244) == io8  # SLEEP_CONTROL_REG
    assert struct.unpack_from("<BBBBQ", fadt, 256) == io8  # SLEEP_STATUS_REG
    assert fadt[268:276] == b"PYVMM   "
    # No legacy PM blocks, no SCI, no FACS in a HW-reduced FADT.
    assert fadt[36:40] == bytes(4) and fadt[46:48] == bytes(2)
    assert fadt[56:88] == bytes(32)
    assert fadt[148:244] == bytes(96)


def walk_madt(madt: bytes) -> list[tuple[int, bytes]]:
    """(type, entry bytes) for every interrupt controller structure; fails on a bad length."""
    entries = []
    off = HEADER_SIZE + 8
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        assert elen >= 2 and off + elen <= len(madt), f"bad MADT entry at {off}"
        entries.append((etype, madt[off:off + elen]))
        off += elen
    assert off == len(madt)
    return entries


@pytest.mark.parametrize("vcpus", [1, 4, 255])
def test_madt_entries(vcpus: int) -> None:
    madt = build_madt(vcpus)
    assert sum(madt) & 0xFF == 0
    assert struct.unpack_from("<I", madt, 4)[0] == len(madt) == HEADER_SIZE + 8 + 12 + 8 * vcpus
    assert madt[8] == 6
    assert struct.unpack_from("<II", madt, HEADER_SIZE) == (0xFEE00000, 0)
    entries = walk_madt(madt)
    ioapics = [e for t, e in entries if t == 1]
    assert len(ioapics) == 1
    assert struct.unpack("<BBBBII", ioapics[0]) == (1, 12, 0, 0, 0xFEC00000, 0)
    lapics = [struct.unpack("<BBBBI", e) for t, e in entries if t == 0]
    assert lapics == [(0, 8, i, i, 1) for i in range(vcpus)]
    assert {t for t, _ in entries} == {0, 1}, "no ISO / NMI entries by default"


def test_madt_optional_entries() -> None:
    madt = build_madt(2, irq0_override=True, lapic_nmi=True)
    assert sum(madt) & 0xFF == 0
    entries = walk_madt(madt)
    iso = [struct.unpack("<BBBBIH", e) for t, e in entries if t == 2]
    nmi = [struct.unpack("<BBBHB", e) for t, e in entries if t == 4]
    assert iso == [(2, 10, 0, 0, 2, 0)]
    assert nmi == [(4, 6, 0xFF, 0, 1)]


def test_dsdt_contains_every_virtio_window(tables) -> None:
    _, dsdt = tables.tables["DSDT"]
    for i, (base, size, gsi) in enumerate(VIRTIO):
        assert f"V{i:03d}".encode() in dsdt
        assert struct.pack("<BHBII", 0x86, 9, 1, base, size) in dsdt
        assert struct.pack("<BHBBI", 0x89, 6, 0x03, 1, gsi) in dsdt
    assert dsdt.count(b"LNRO0005") == len(VIRTIO)


def test_placement_inside_area_without_overlap(tables) -> None:
    spans = sorted((gpa, gpa + len(data)) for gpa, data in tables.blobs)
    assert len(spans) == 5
    assert spans[0][0] == layout.ACPI_TABLES_ADDR == 0xE0000
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert spans[-1][1] <= layout.ACPI_TABLES_END == 0x100000
    for gpa, _ in tables.blobs:
        assert gpa % 16 == 0


def test_write_to_memory_and_follow_pointers(tables) -> None:
    """Follow RSDP -> XSDT -> FADT -> DSDT in guest memory, as the guest does."""
    mem = GuestMemory.from_ranges([(0, 1 << 20)])
    tables.write_to(mem)
    rsdp = mem.read(tables.rsdp_addr, 36)
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt_len = mem.read_u32(xsdt_addr + 4)
    xsdt = mem.read(xsdt_addr, xsdt_len)
    assert sum(xsdt) & 0xFF == 0
    seen = {}
    for (addr,) in struct.iter_unpack("<Q", xsdt[HEADER_SIZE:]):
        sig = mem.read(addr, 4).decode()
        seen[sig] = mem.read(addr, mem.read_u32(addr + 4))
        assert sum(seen[sig]) & 0xFF == 0
    assert set(seen) == {"FACP", "APIC"}
    dsdt_addr = struct.unpack_from("<Q", seen["FACP"], 140)[0]
    dsdt = mem.read(dsdt_addr, mem.read_u32(dsdt_addr + 4))
    assert dsdt == tables.tables["DSDT"][1]


def test_write_to_fails_without_ram_there(tables) -> None:
    mem = GuestMemory.from_ranges([(0, 0xA0000)])  # RAM ends below the ACPI area
    with pytest.raises(ValueError):
        tables.write_to(mem)


def test_no_virtio_devices() -> None:
    t = build_acpi_tables(1, [])
    assert b"LNRO0005" not in t.tables["DSDT"][1]
    assert sum(t.tables["DSDT"][1]) & 0xFF == 0


@pytest.mark.parametrize("vcpus", [0, 256, -1, True, 1.0, "2"])
def test_bad_vcpus(vcpus) -> None:
    with pytest.raises(ValueError, match="vcpus"):
        build_acpi_tables(vcpus, [])


@pytest.mark.parametrize(
    "devices, match",
    [
        ([(0xD0000000, 0x1000, 5), (0xD0000800, 0x1000, 6)], "overlapping"),
        ([(0xD0000000, 0x1000, 5), (0xD0001000, 0x1000, 5)], "share GSI"),
        ([(0xD0000000, 0x1000, 4)], "COM1"),
        ([(0xD0000000, 0x1000, 1)], "i8042"),
        ([(0xD0000000, 0x1000, 0)], "PIT"),
        ([(0xD0000000, 0x1000, 24)], "I/O APIC pin"),
        ([(0xFFFFF000, 0x2000, 5)], "below 4 GiB"),
        ([(0xD0000000, 0, 5)], "non-empty"),
        ([(-0x1000, 0x1000, 5)], "below 4 GiB"),
        ([(0xD0000000, 0x1000)], "expected"),
        ([None], "expected"),
        ([(0xD0000000, 0x1000, "5")], "integers"),
    ],
)
def test_bad_virtio_devices(devices, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_acpi_tables(1, devices)


def test_every_free_gsi_fits() -> None:
    free = (g for g in range(24) if g not in (0, 1, 2, 4))
    devices = [(0xD0000000 + i * 0x1000, 0x1000, gsi) for i, gsi in enumerate(free)]
    assert len(devices) == 20
    t = build_acpi_tables(255, devices)
    assert t.tables["DSDT"][1].count(b"LNRO0005") == 20


def test_arena_refuses_tables_that_do_not_fit() -> None:
    arena = TableArena(0x1000, 0x1040)
    assert arena.place("AAAA", bytes(0x20)) == 0x1000
    assert arena.place("BBBB", bytes(0x20)) == 0x1020
    with pytest.raises(ValueError, match="do not fit"):
        arena.place("CCCC", bytes(1))


def test_without_i8042() -> None:
    """i8042=False: no PNP0303 device and the FADT 8042 bit clear, so Linux does not probe it."""
    with_kbd = build_acpi_tables(1, VIRTIO)
    without = build_acpi_tables(1, VIRTIO, i8042=False)
    assert b"PS2_" in with_kbd.tables["DSDT"][1]
    assert b"PS2_" not in without.tables["DSDT"][1]
    assert bytes.fromhex("0c41d00303") not in without.tables["DSDT"][1]  # EISAID PNP0303
    boot_arch = struct.unpack_from("<H", without.tables["FACP"][1], 109)[0]
    assert boot_arch & 0b10 == 0
    assert boot_arch == fadt_mod.IAPC_BOOT_ARCH & ~0b10
    for _, table in without.blobs:
        assert sum(table) & 0xFF == 0
