"""Identity page tables, boot GDT and IDT: the memory a 64-bit kernel entry point expects.

The Linux 64-bit boot protocol enters ``startup_64`` in long mode with paging on, so the VMM must
provide page tables that identity-map at least the kernel, the zero page and the command line.  We
map [0, 4 GiB) with 2 MiB pages (1 GiB pages need the pdpe1gb CPUID bit, which is not guaranteed),
so the initrd and the MMIO windows are covered too.  The GDT has the flat 64-bit code/data segments
and a TSS descriptor (KVM wants a usable TR); the IDT is empty: until the kernel installs its own,
any exception is a triple fault, which ends the VM with KVM_EXIT_SHUTDOWN instead of looping.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from devices.memory import GuestMemoryAccess

from .. import layout

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7          # in a PD entry: this maps a 2 MiB page
PAGE_2M = 2 << 20
ENTRIES_PER_TABLE = 512

# GDT selectors (index * 8)
GDT_CODE_SELECTOR = 0x08
GDT_DATA_SELECTOR = 0x10
GDT_TSS_SELECTOR = 0x18

# gdt_entry() flags: [15:12] G, D/B, L, AVL ; [7:0] access byte (P, DPL, S, type)
GDT_FLAGS_CODE64 = 0xA09B       # G=1 L=1, P=1 S=1 type=0xB (execute/read, accessed)
GDT_FLAGS_DATA = 0xC093         # G=1 D/B=1, P=1 S=1 type=0x3 (read/write, accessed)
GDT_FLAGS_TSS = 0x808B          # G=1, P=1 S=0 type=0xB (busy 64-bit TSS)


def page_tables(gib: int = layout.IDENTITY_MAP_GIB) -> dict[int, bytes]:
    """{guest address: table bytes} for an identity map of [0, gib GiB) with 2 MiB pages."""
    if not 1 <= gib <= ENTRIES_PER_TABLE:
        raise ValueError(f"identity map of {gib} GiB not supported")
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE) + bytes(8 * 511)
    pdpt = b"".join(struct.pack("<Q", (layout.PD_ADDR + i * 0x1000) | PTE_PRESENT | PTE_WRITABLE)
                    for i in range(gib)) + bytes(8 * (ENTRIES_PER_TABLE - gib))
    tables = {layout.PML4_ADDR: pml4, layout.PDPT_ADDR: pdpt}
    for i in range(gib):
        pd = struct.pack(f"<{ENTRIES_PER_TABLE}Q", *(
            ((i * ENTRIES_PER_TABLE + j) * PAGE_2M) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE
            for j in range(ENTRIES_PER_TABLE)))
        tables[layout.PD_ADDR + i * 0x1000] = pd
    return tables


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A GDT descriptor from Firecracker-style (flags, base, limit)."""
    return (((base & 0xFF000000) << 32) | ((flags & 0x0000F0FF) << 40)
            | ((limit & 0x000F0000) << 32) | ((base & 0x00FFFFFF) << 16) | (limit & 0x0000FFFF))


def boot_gdt() -> list[int]:
    return [
        0,                                          # null
        gdt_entry(GDT_FLAGS_CODE64, 0, 0xFFFFF),    # 0x08: 64-bit code
        gdt_entry(GDT_FLAGS_DATA, 0, 0xFFFFF),      # 0x10: data
        gdt_entry(GDT_FLAGS_TSS, 0, 0xFFFFF),       # 0x18: TSS
    ]


def gdt_bytes(entries: list[int] | None = None) -> bytes:
    entries = boot_gdt() if entries is None else entries
    return struct.pack(f"<{len(entries)}Q", *entries)


IDT_LIMIT = 7
IDT_BYTES = bytes(8)


@dataclass(frozen=True)
class Segment:
    """A GDT descriptor decoded into the fields of ``struct kvm_segment``."""
    base: int
    limit: int          # byte granular (scaled by G)
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the descriptor's L (64-bit code) bit, named as in the SDM
    g: int
    avl: int

    def to_kvm(self, seg) -> None:
        """Fill a ``kvm_segment`` ctypes struct in place."""
        seg.base = self.base
        seg.limit = self.limit
        seg.selector = self.selector
        seg.type = self.type
        seg.present = self.present
        seg.dpl = self.dpl
        seg.db = self.db
        seg.s = self.s
        seg.l = self.l
        seg.g = self.g
        seg.avl = self.avl
        seg.unusable = 0 if self.present else 1


def decode_descriptor(entry: int, selector: int) -> Segment:
    base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    raw_limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    limit = (raw_limit << 12) | 0xFFF if g else raw_limit
    return Segment(
        base=base, limit=limit, selector=selector,
        type=(entry >> 40) & 0xF, s=(entry >> 44) & 1, dpl=(entry >> 45) & 3,
        present=(entry >> 47) & 1, avl=(entry >> 52) & 1, l=(entry >> 53) & 1,
        db=(entry >> 54) & 1, g=g,
    )


def write_boot_tables(memory: GuestMemoryAccess) -> None:
    """Write page tables, GDT and IDT to guest memory at their layout addresses (each must fit the
    room the layout reserves for it, or it would overwrite its neighbour)."""
    tables = page_tables()
    if max(addr + len(data) for addr, data in tables.items()) > layout.PAGE_TABLES_END:
        raise ValueError("boot page tables overrun layout.PAGE_TABLES_END")
    gdt = gdt_bytes()
    if len(gdt) > layout.GDT_ENTRIES * 8:
        raise ValueError(f"boot GDT of {len(gdt) // 8} entries > layout.GDT_ENTRIES")
    for addr, data in tables.items():
        memory.write(addr, data)
    memory.write(layout.GDT_ADDR, gdt)
    memory.write(layout.IDT_ADDR, IDT_BYTES)
