"""Identity page tables and the boot GDT decode to what the 64-bit entry expects."""

from __future__ import annotations

import struct

import pytest

from vmm import layout
from vmm.boot import paging
from vmm.memory import guest_ram

MiB = 1 << 20


@pytest.fixture(scope="module")
def mem():
    m = guest_ram(32 * MiB)
    paging.write_boot_tables(m)
    yield m
    m.close()


def walk(mem, va: int) -> int:
    """Software 4-level page walk from CR3 = PML4_ADDR; returns the physical address."""
    pml4e = mem.read_u64(layout.PML4_ADDR + ((va >> 39) & 0x1FF) * 8)
    assert pml4e & 1, f"PML4 entry not present for {va:#x}"
    pdpte = mem.read_u64((pml4e & 0x000FFFFFFFFFF000) + ((va >> 30) & 0x1FF) * 8)
    assert pdpte & 1, f"PDPT entry not present for {va:#x}"
    assert not pdpte & 0x80, "1 GiB page not expected"
    pde = mem.read_u64((pdpte & 0x000FFFFFFFFFF000) + ((va >> 21) & 0x1FF) * 8)
    assert pde & 1, f"PD entry not present for {va:#x}"
    assert pde & 0x80, "expected a 2 MiB page"
    assert pde & 2, "expected writable"
    return (pde & 0x000FFFFFFFE00000) | (va & 0x1FFFFF)


@pytest.mark.parametrize("va", [0, 0x7000, 0x20000, 0x1000000, 0x1234567, 3 << 30,
                                0xD0000050, 0xFEC00000, 0xFEE00300, (4 << 30) - 1])
def test_identity_map_covers_4gib(mem, va):
    assert walk(mem, va) == va


def test_nothing_mapped_at_or_above_4gib(mem):
    pdpte = mem.read_u64(layout.PDPT_ADDR + 4 * 8)
    assert pdpte == 0
    pml4e1 = mem.read_u64(layout.PML4_ADDR + 8)
    assert pml4e1 == 0


def test_tables_fit_below_cmdline():
    tables = paging.page_tables()
    assert all(len(t) == 4096 for t in tables.values())
    assert max(tables) + 4096 == layout.PAGE_TABLES_END <= layout.CMDLINE_ADDR
    assert min(tables) == layout.PML4_ADDR


def test_gdt_matches_reference_values(mem):
    raw = mem.read(layout.GDT_ADDR, 32)
    assert struct.unpack("<4Q", raw) == (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
    assert mem.read(layout.IDT_ADDR, 8) == bytes(8)


def test_gdt_entry_encoding():
    assert paging.gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert paging.gdt_entry(0x808B, 0x12345678, 0x67) == 0x12808B3456780067


def test_descriptor_decoding():
    gdt = paging.boot_gdt()
    code = paging.decode_descriptor(gdt[1], 0x08)
    assert (code.l, code.db, code.type, code.s, code.present, code.g, code.dpl) == (1, 0, 0xB, 1, 1, 1, 0)
    assert code.limit == 0xFFFFFFFF and code.base == 0
    data = paging.decode_descriptor(gdt[2], 0x10)
    assert (data.l, data.db, data.type, data.s) == (0, 1, 3, 1)
    tss = paging.decode_descriptor(gdt[3], 0x18)
    assert (tss.type, tss.s, tss.present) == (0xB, 0, 1)
    odd = paging.decode_descriptor(paging.gdt_entry(0x0093, 0xABCDEF12, 0x12345), 0x20)
    assert odd.base == 0xABCDEF12 and odd.limit == 0x12345 and odd.g == 0


def test_bad_identity_map_size():
    with pytest.raises(ValueError):
        paging.page_tables(0)
