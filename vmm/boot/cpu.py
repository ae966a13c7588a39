"""Per-vCPU register state for a 64-bit Linux direct boot (Firecracker's order and values).

Every vCPU gets CPUID (KVM_GET_SUPPORTED_CPUID patched with its APIC id), the boot MSRs and its
LAPIC LINT pins.  Only the boot processor (index 0) gets long-mode segments, page tables, FPU and
general registers: the others stay in KVM's wait-for-SIPI state until the guest kernel starts them
with INIT/SIPI through the in-kernel LAPIC, which resets them to real mode itself.

Note (kvm_pvm, see the platform reference): CPUID set here does not reach the guest there; the
guest command line hides features instead.  We still set it correctly for real KVM.
"""

from __future__ import annotations

import ctypes
import logging
import struct

from kvm_sys import KvmError, Vcpu
from kvm_sys import bindings as kb
from kvm_sys.flex import make_flex

from .. import layout
from . import paging

logger = logging.getLogger(__name__)

# CPUID bits
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
CPUID_6_EAX_TURBO = 1 << 1

# MSRs (Intel SDM vol. 4)
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6

# Control registers
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# LAPIC
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

FPU_FCW = 0x37F
FPU_MXCSR = 0x1F80
RFLAGS_RESERVED = 0x2


def boot_msrs() -> list[tuple[int, int]]:
    """MSR values at boot (Firecracker's create_boot_msr_entries)."""
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]


KVM_CPUID_FEATURES = 0x40000001     # KVM paravirt feature leaf (asm/kvm_para.h)
KVM_FEATURE_PV_SEND_IPI = 11


def vcpu_cpuid(supported: kb.kvm_cpuid2, index: int, num_vcpus: int) -> kb.kvm_cpuid2:
    """A copy of ``supported`` (nent entries) patched for vCPU ``index`` of ``num_vcpus``."""
    n = supported.nent
    out = make_flex(kb.kvm_cpuid2, n)
    out.nent = n
    ctypes.memmove(ctypes.addressof(out.entries), ctypes.addressof(supported.entries),
                   n * ctypes.sizeof(kb.kvm_cpuid_entry2))
    for i in range(n):
        e = out.entries[i]
        if e.function == 1:
            # EBX: [31:24] initial APIC id, [23:16] logical processors per package, [15:8] CLFLUSH
            # line size in quadwords (8 = 64 bytes).
            e.ebx = (index << 24) | (max(num_vcpus, 1) << 16) | (8 << 8) | (e.ebx & 0xFF)
            e.ecx |= CPUID_1_ECX_HYPERVISOR | CPUID_1_ECX_TSC_DEADLINE
            if num_vcpus > 1:
                e.edx |= CPUID_1_EDX_HTT
            else:
                e.edx &= ~CPUID_1_EDX_HTT & 0xFFFFFFFF
        elif e.function in (0xB, 0x1F):
            # Extended topology: one thread per core, num_vcpus cores in one package. The host's
            # values (SMT siblings) would contradict leaf 4 and Linux reports "topology borken".
            e.edx = index                     # x2APIC id of this logical processor
            if e.index == 0:                  # SMT level
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | 0
            elif e.index == 1:                # core level
                e.eax = max(num_vcpus - 1, 0).bit_length()
                e.ebx, e.ecx = num_vcpus, (2 << 8) | 1
            else:                             # no further levels
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif e.function == 4 and e.eax & 0x1F:
            # Deterministic cache parameters: L1/L2 private to a core, L3 shared by all vCPUs,
            # num_vcpus cores per package (EAX[31:26] + 1), consistent with leaf 0xB above.
            level = (e.eax >> 5) & 0x7
            sharing = num_vcpus - 1 if level >= 3 else 0
            e.eax = (e.eax & 0x3FFF) | (sharing << 14) | ((num_vcpus - 1) << 26)
        elif e.function == 0x80000008:
            e.ecx = (e.ecx & ~0xFF & 0xFFFFFFFF) | (num_vcpus - 1)   # AMD: cores per package - 1
        elif e.function == 6:
            e.eax &= ~CPUID_6_EAX_TURBO & 0xFFFFFFFF
        elif e.function == 0xA:
            e.eax = e.ebx = e.ecx = e.edx = 0  # no architectural PMU
        elif e.function == KVM_CPUID_FEATURES:
            # PV send-IPI makes an AP issue a KVM_HC_SEND_IPI vmcall while it comes up; on kvm_pvm
            # that vmcall never completes and SMP boot hangs (seen: vcpu1 RIP on 0f 01 c1, rax=10).
            # Plain x2APIC/xAPIC IPIs work everywhere, so do not offer the PV path.
            e.eax &= ~(1 << KVM_FEATURE_PV_SEND_IPI) & 0xFFFFFFFF
    return out


def set_lint(vcpu: Vcpu) -> None:
    """LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as on a PC."""
    lapic = vcpu.get_lapic()
    regs = memoryview(lapic).cast("B")[kb.kvm_lapic_state.regs.offset:]
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", regs, reg)[0]
        struct.pack_into("<I", regs, reg, (value & ~0x700) | (mode << 8))
    regs.release()
    vcpu.set_lapic(lapic)


def set_msrs(vcpu: Vcpu, msrs: list[tuple[int, int]]) -> None:
    """Set all; if KVM rejects one, set the rest one by one and log the rejected ones."""
    try:
        vcpu.set_msrs(msrs)
        return
    except KvmError as e:
        logger.debug("vcpu%d: batch MSR write failed (%s); retrying one by one", vcpu.index, e)
    for index, value in msrs:
        try:
            vcpu.set_msrs([(index, value)])
        except KvmError:
            logger.warning("vcpu%d: KVM rejected MSR %#x = %#x", vcpu.index, index, value)


def long_mode_sregs(sregs: kb.kvm_sregs) -> None:
    """Segments from the boot GDT, page tables, CR0/CR4/EFER for 64-bit mode (in place)."""
    gdt = paging.boot_gdt()
    code = paging.decode_descriptor(gdt[1], paging.GDT_CODE_SELECTOR)
    data = paging.decode_descriptor(gdt[2], paging.GDT_DATA_SELECTOR)
    tss = paging.decode_descriptor(gdt[3], paging.GDT_TSS_SELECTOR)
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(gdt) * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = paging.IDT_LIMIT
    code.to_kvm(sregs.cs)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        data.to_kvm(seg)
    tss.to_kvm(sregs.tr)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = X86_CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def configure_vcpu(vcpu: Vcpu, supported_cpuid: kb.kvm_cpuid2, index: int, num_vcpus: int,
                   boot) -> None:
    """Set up vCPU ``index`` before its first KVM_RUN.  ``boot``: a ``BootInfo`` (entry, zero page)."""
    vcpu.set_cpuid2(vcpu_cpuid(supported_cpuid, index, num_vcpus))
    set_msrs(vcpu, boot_msrs())
    set_lint(vcpu)
    if index != 0:
        return  # started by the BSP with INIT/SIPI
    fpu = kb.kvm_fpu()
    fpu.fcw = FPU_FCW
    fpu.mxcsr = FPU_MXCSR
    vcpu.set_fpu(fpu)
    sregs = vcpu.get_sregs()
    long_mode_sregs(sregs)
    vcpu.set_sregs(sregs)
    regs = kb.kvm_regs()
    regs.rflags = RFLAGS_RESERVED
    regs.rip = boot.entry
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = boot.boot_params_addr
    vcpu.set_regs(regs)
