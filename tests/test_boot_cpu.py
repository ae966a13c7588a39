"""Per-vCPU setup: CPUID patching, and a real long-mode guest entered with our page tables, GDT
and register state (port I/O in and out, a RAM store, an MMIO exit, an ioeventfd write)."""

from __future__ import annotations

import os
import struct

import pytest

from kvm_sys import IoExit, Kvm, MmioExit, bindings as kb
from kvm_sys.flex import make_flex
from vmm import layout
from vmm.boot import BootInfo, cpu, paging
from vmm.memory import guest_ram

MiB = 1 << 20

KVM = pytest.mark.skipif(
    not os.path.exists("/dev/kvm"),
    reason="!!! /dev/kvm is absent: the long-mode guest test CANNOT run on this machine !!!")


def _cpuid(entries):
    c = make_flex(kb.kvm_cpuid2, len(entries))
    c.nent = len(entries)
    for i, (fn, idx, eax, ebx, ecx, edx) in enumerate(entries):
        e = c.entries[i]
        e.function, e.index, e.eax, e.ebx, e.ecx, e.edx = fn, idx, eax, ebx, ecx, edx
    return c


def test_vcpu_cpuid_patching():
    sup = _cpuid([(0, 0, 0xD, 1, 2, 3), (1, 0, 0x306A9, 0xFF_FF_FF_11, 0, 1 << 28),
                  (6, 0, 0x7, 0, 0, 0), (0xA, 0, 1, 2, 3, 4), (0xB, 0, 1, 2, 0x100, 99),
                  (0xB, 1, 4, 4, 0x201, 99)])
    out = cpu.vcpu_cpuid(sup, index=3, num_vcpus=4)
    assert out.nent == 6
    e = {(out.entries[i].function, out.entries[i].index): out.entries[i] for i in range(6)}
    leaf1 = e[(1, 0)]
    assert leaf1.ebx >> 24 == 3 and (leaf1.ebx >> 16) & 0xFF == 4 and (leaf1.ebx >> 8) & 0xFF == 8
    assert leaf1.ebx & 0xFF == 0x11
    assert leaf1.ecx & cpu.CPUID_1_ECX_HYPERVISOR and leaf1.ecx & cpu.CPUID_1_ECX_TSC_DEADLINE
    assert leaf1.edx & cpu.CPUID_1_EDX_HTT
    assert e[(0xB, 0)].edx == 3 and e[(0xB, 1)].edx == 3
    assert e[(6, 0)].eax & cpu.CPUID_6_EAX_TURBO == 0
    assert (e[(0xA, 0)].eax, e[(0xA, 0)].edx) == (0, 0)
    assert e[(0, 0)].eax == 0xD
    # the supported list itself is untouched
    assert sup.entries[1].ebx == 0xFF_FF_FF_11
    single = cpu.vcpu_cpuid(sup, index=0, num_vcpus=1)
    assert single.entries[1].edx & cpu.CPUID_1_EDX_HTT == 0 and single.entries[1].ebx >> 24 == 0


def test_long_mode_sregs_values():
    s = kb.kvm_sregs()
    cpu.long_mode_sregs(s)
    assert s.cr0 & (cpu.X86_CR0_PE | cpu.X86_CR0_PG) == cpu.X86_CR0_PE | cpu.X86_CR0_PG
    assert s.cr4 & cpu.X86_CR4_PAE and s.efer == cpu.EFER_LME | cpu.EFER_LMA
    assert s.cr3 == layout.PML4_ADDR
    assert (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit) == (0x500, 31, 0x520, 7)
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.present) == (8, 1, 0, 1)
    assert all(seg.selector == 0x10 for seg in (s.ds, s.es, s.fs, s.gs, s.ss))
    assert (s.tr.selector, s.tr.type, s.tr.s) == (0x18, 0xB, 0)


def test_boot_msrs_reference_values():
    m = dict(cpu.boot_msrs())
    assert m[0x1A0] == 1 and m[0x2FF] == (1 << 11) | 6
    assert all(m[i] == 0 for i in (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083,
                                   0xC0000084, 0xC0000102, 0x10))


# .code64 at 0x100000:
#   mov $0x3f8,%dx; mov $'Z',%al; out %al,%dx          -> PIO out exit
#   mov $0x200000,%eax; movl $0xdeadbeef,(%rax)        -> RAM store, no exit
#   mov $0xd0000000,%ebx; movl $0x12345678,(%rbx)      -> MMIO exit
#   movl $0,0x50(%rbx)                                 -> ioeventfd (datamatch 0), no exit
#   mov $0x501,%dx; in (%dx),%al                       -> PIO in exit (we answer 0x77)
#   mov $0x500,%dx; out %al,%dx                        -> PIO out of what we answered
#   hlt
LONG_MODE_CODE = bytes.fromhex(
    "66baf803b05aeeb800002000c700efbeaddebb000000d0c70378563412c7"
    "43500000000066ba0105ec66ba0005eef4")
CODE_ADDR = 0x100000


@KVM
def test_long_mode_guest_with_boot_state():
    mem = guest_ram(4 * MiB)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpu = None
        try:
            vm.set_tss_addr(layout.TSS_ADDR)
            vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
            vm.create_irqchip()
            vm.create_pit2(kb.KVM_PIT_SPEAKER_DUMMY)
            mem.register(vm)
            vm.ioeventfd(efd, 0xD0000050, 4, datamatch=0)
            paging.write_boot_tables(mem)
            mem.write(CODE_ADDR, LONG_MODE_CODE)
            vcpu = vm.create_vcpu(0)
            boot = BootInfo(entry=CODE_ADDR, boot_params_addr=layout.ZERO_PAGE_ADDR, kind="test")
            cpu.configure_vcpu(vcpu, kvm.get_supported_cpuid(), 0, 1, boot)

            regs = vcpu.get_regs()
            assert (regs.rip, regs.rsi, regs.rsp, regs.rflags) == (CODE_ADDR, 0x7000, 0x8FF0, 2)
            lapic = vcpu.get_lapic()
            raw = bytes(memoryview(lapic).cast("B"))
            assert (struct.unpack_from("<I", raw, 0x350)[0] >> 8) & 7 == cpu.APIC_MODE_EXTINT
            assert (struct.unpack_from("<I", raw, 0x360)[0] >> 8) & 7 == cpu.APIC_MODE_NMI
            assert vcpu.get_msrs([0x2FF])[0x2FF] == (1 << 11) | 6

            events = []
            for _ in range(20):
                ex = vcpu.run()
                if isinstance(ex, IoExit):
                    if ex.is_out:
                        events.append(("out", ex.port, bytes(ex.data)))
                        if ex.port == 0x500:
                            break
                    else:
                        events.append(("in", ex.port, ex.size))
                        ex.data[:] = b"\x77"
                elif isinstance(ex, MmioExit):
                    events.append(("mmio", ex.address, len(ex.data), int(ex.is_write), bytes(ex.data)))
                else:
                    regs = vcpu.get_regs()
                    pytest.fail(f"unexpected exit {ex!r} at rip {regs.rip:#x}; events {events}")
            assert events == [
                ("out", 0x3F8, b"Z"),
                ("mmio", 0xD0000000, 4, 1, struct.pack("<I", 0x12345678)),
                ("in", 0x501, 1),
                ("out", 0x500, b"\x77"),
            ]
            assert mem.read_u32(0x200000) == 0xDEADBEEF
            assert os.eventfd_read(efd) == 1      # the QueueNotify-style write bypassed us
            sregs = vcpu.get_sregs()
            assert sregs.efer & cpu.EFER_LMA and sregs.cs.l == 1
        finally:
            if vcpu is not None:
                vcpu.close()
            vm.close()
            os.close(efd)
            mem.close()


@KVM
def test_secondary_vcpu_gets_no_boot_registers():
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.create_irqchip()
        try:
            bsp = vm.create_vcpu(0)
            ap = vm.create_vcpu(1)
            boot = BootInfo(entry=0x1000000, boot_params_addr=0x7000, kind="test")
            sup = kvm.get_supported_cpuid()
            cpu.configure_vcpu(bsp, sup, 0, 2, boot)
            cpu.configure_vcpu(ap, sup, 1, 2, boot)
            assert bsp.get_regs().rip == 0x1000000
            assert ap.get_regs().rip != 0x1000000          # stays at reset state until SIPI
            assert ap.get_sregs().efer & cpu.EFER_LMA == 0
            assert ap.get_mp_state() == kb.KVM_MP_STATE_UNINITIALIZED
            bsp.close()
            ap.close()
        finally:
            vm.close()
