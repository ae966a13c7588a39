"""The vCPU loop against real KVM: a real-mode guest whose port I/O (single and string) and MMIO
reads and writes must reach bus devices, and whose reads must see the devices' answers."""

from __future__ import annotations

import os
import threading

import pytest

from kvm_sys import Kvm
from vmm.bus import Bus
from vmm.memory import GuestMemory
from vmm.vcpu import Stop, VcpuThread, describe_thread

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/kvm"),
    reason="!!! /dev/kvm is absent: the vCPU loop CANNOT be tested on this machine !!!")

CODE_ADDR = 0x1000
# .code16, ds = es = 0:
#   out 'A' to 0x500; in from 0x500 -> [0x3000]; rep outsb 3 bytes of [0x3100] to 0x500;
#   rep insb 2 bytes from 0x500 -> [0x3200]; ds = 0x2000: movw $0xbeef -> MMIO 0x20000;
#   mov MMIO 0x20004 -> ax -> [0x3004] (ds = 0); out to 0x501 (done); hlt
CODE = bytes.fromhex(
    "31c08ed88ec0ba0005b041eeeca20030be0031b90300fcf36ebf0032b90200f36cb800208ed8c7060000efbea104"
    "0031db8edba30430ba0105eef4")


class Recorder:
    """A bus device that logs accesses and answers reads from a queue of byte values."""

    def __init__(self, answers: list[int]) -> None:
        self.log: list[tuple] = []
        self.answers = answers

    def read(self, offset: int, size: int) -> bytes:
        self.log.append(("read", offset, size))
        return bytes(self.answers.pop(0) for _ in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("write", offset, bytes(data)))


def test_port_io_and_mmio_reach_the_buses():
    memory = GuestMemory.from_ranges([(0, 0x10000)])
    memory.write(CODE_ADDR, CODE)
    memory.write(0x3100, b"xyz")
    stops: list[Stop] = []
    stopping = threading.Event()
    port = Recorder([0x42, 0x43, 0x44])
    window = Recorder([0x34, 0x12])

    class Done:
        def read(self, offset: int, size: int) -> bytes:
            return bytes(size)

        def write(self, offset: int, data: bytes) -> None:
            stopping.set()            # the loop returns at the guest's HLT exit

    pio, mmio = Bus("pio"), Bus("mmio")
    pio.insert(0x500, 1, port, "port")
    pio.insert(0x501, 1, Done(), "done")
    mmio.insert(0x20000, 0x1000, window, "window")
    with Kvm() as kvm, kvm.create_vm() as vm:
        memory.register(vm)
        with vm.create_vcpu(0) as vcpu:
            sregs = vcpu.get_sregs()
            sregs.cs.base = sregs.cs.selector = 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = CODE_ADDR, 2
            vcpu.set_regs(regs)
            t = VcpuThread(vcpu, pio, mmio, memory, stops.append, stopping)
            t.start()
            t.join(30)
            assert not t.is_alive(), "guest did not finish"
            report = describe_thread(t)
    memory_bytes = memory.read(0x3000, 6), memory.read(0x3200, 2)
    memory.close()
    assert stops == []
    outs = b"".join(d for kind, _, d in port.log if kind == "write")
    assert outs == b"Axyz"                            # single OUT, then the string OUT in order
    assert [e for e in port.log if e[0] == "read"] == [("read", 0, 1)] * 3
    assert window.log == [("write", 0, b"\xef\xbe"), ("read", 4, 2)]
    assert memory_bytes == (b"\x42\x00\x00\x00\x34\x12", b"\x43\x44")
    assert t.exits >= 7 and "KVM_EXIT_IO=" in report and "KVM_EXIT_MMIO=2" in report

