"""Describe a stopped vCPU for a human: registers and the instruction bytes at RIP.

Used when KVM cannot go on (an emulation failure on kvm_pvm, a failed entry): the bytes at RIP say
which instruction the emulator refused, which is what you need to pick a kernel workaround.
"""

from __future__ import annotations

import logging

from devices.memory import GuestMemoryAccess

logger = logging.getLogger(__name__)

PAGE_PRESENT = 1 << 0
PAGE_SIZE_BIT = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
INSN_BYTES = 16

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


def translate(memory: GuestMemoryAccess, cr3: int, vaddr: int, levels: int = 4) -> int | None:
    """Walk x86-64 page tables in guest memory; None if unmapped or the tables are outside RAM."""
    table = cr3 & ADDR_MASK
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        index = (vaddr >> shift) & 0x1FF
        try:
            entry = memory.read_u64(table + index * 8)
        except ValueError:
            return None
        if not entry & PAGE_PRESENT:
            return None
        if level in (2, 3) and entry & PAGE_SIZE_BIT:
            base = entry & ADDR_MASK & ~((1 << shift) - 1)
            return base | (vaddr & ((1 << shift) - 1))
        table = entry & ADDR_MASK
    return table | (vaddr & 0xFFF)


def instruction_bytes(memory: GuestMemoryAccess, sregs, rip: int) -> bytes | None:
    phys: int | None
    if not sregs.cr0 & CR0_PG:
        phys = rip
    elif sregs.efer & EFER_LMA:
        phys = translate(memory, sregs.cr3, rip, 5 if sregs.cr4 & CR4_LA57 else 4)
    else:
        return None     # 32-bit paging: not a mode our guests run in
    if phys is None:
        return None
    out = bytearray()
    for i in range(INSN_BYTES):    # byte by byte: the instruction may straddle a page
        addr = phys + i if not sregs.cr0 & CR0_PG else (
            translate(memory, sregs.cr3, rip + i) if sregs.efer & EFER_LMA else None)
        if addr is None:
            break
        try:
            out += memory.read(addr, 1)
        except ValueError:
            break
    return bytes(out)


def describe_vcpu(vcpu, memory: GuestMemoryAccess) -> str:
    """Never raises: a diagnostic that fails must not hide the original problem."""
    lines = []
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except Exception as exc:  # noqa: BLE001
        return f"  (registers unavailable: {exc})"
    values = [f"{name}={getattr(regs, name):#018x}" for name in GPRS]
    for i in range(0, len(values), 4):
        lines.append("  " + " ".join(values[i:i + 4]))
    lines.append(f"  cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
                 f"efer={sregs.efer:#x} cs={sregs.cs.selector:#x}")
    try:
        code = instruction_bytes(memory, sregs, regs.rip)
    except Exception as exc:  # noqa: BLE001
        code = None
        logger.debug("cannot read instruction bytes: %s", exc)
    if code:
        lines.append(f"  bytes at rip: {code.hex(' ')}")
    else:
        lines.append("  bytes at rip: (not mapped)")
    return "\n".join(lines)
