"""vCPU exit-loop cost: what the VMM adds per port-I/O and MMIO exit on top of KVM_RUN itself.

A tiny real-mode guest writes one byte N times, either to an I/O port or to an unbacked guest-physical
address (an MMIO exit each time), then tells the VMM it is done and halts. The same guest runs twice:

- reference: a bare ``ioctl(KVM_RUN)`` loop through ctypes that only counts exits (no decoding, no
  dispatch): the cost of the exit itself on this host;
- vmm: ``vmm.vcpu.VcpuThread``'s loop, decoding every exit and dispatching it to a Bus device.

``ratio`` = vmm time / reference time for the same number of exits; ``overhead_us_per_exit`` is the
difference divided by the exit count. Both are measured in the same run, so the ratio compares
runs across machines and versions of the loop.

    python bench/vcpu_exits.py [--exits 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402

CODE_ADDR = 0x1000
MEMORY_SIZE = 0x10000          # RAM [0, 64 KiB); the MMIO target below lies outside it
COUNT_PORT = 0x500             # each write: one exit
DONE_PORT = 0x501              # the guest's last write before it halts
MMIO_ADDR = 0x20000            # ds=0x2000, offset 0: unbacked, so every store is an MMIO exit


def pio_code(n: int) -> bytes:
    """.code16: mov $n,%cx; mov $0x500,%dx; 1: out %al,%dx; loop 1b; mov $0x501,%dx; out %al,%dx; hlt"""
    return b"\xb9" + n.to_bytes(2, "little") + bytes.fromhex("ba0005eee2fdba0105eef4")


def mmio_code(n: int) -> bytes:
    """.code16: mov $n,%cx; mov $0x2000,%ax; mov %ax,%ds; 2: mov %al,(0); loop 2b; out to 0x501; hlt"""
    return b"\xb9" + n.to_bytes(2, "little") + bytes.fromhex("b800208ed8a20000e2fbba0105eef4")


class _Sink:
    """A bus device that accepts writes and counts them (what the VMM dispatches to)."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1


class _Guest:
    """A VM with 64 KiB of RAM and one vCPU in real mode at CODE_ADDR."""

    def __init__(self, kvm, code: bytes) -> None:
        from vmm.memory import GuestMemory
        self.vm = kvm.create_vm()
        self.memory = GuestMemory.from_ranges([(0, MEMORY_SIZE)])
        self.memory.register(self.vm)
        self.memory.write(CODE_ADDR, code)
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip = CODE_ADDR
        regs.rflags = 2
        self.vcpu.set_regs(regs)

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.memory.close()


def run_reference(kvm, code: bytes) -> tuple[float, int]:
    """Bare KVM_RUN through ctypes until the guest halts; (seconds, exits)."""
    from kvm_sys import bindings as kb
    libc = ctypes.CDLL(None, use_errno=True)
    ioctl = libc.ioctl
    ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
    g = _Guest(kvm, code)
    try:
        fd = g.vcpu.fd
        run = kb.kvm_run.from_buffer(g.vcpu._mmap)
        exits = 0
        t0 = time.perf_counter()
        while True:
            if ioctl(fd, kb.KVM_RUN, 0) < 0:
                raise OSError(ctypes.get_errno(), "KVM_RUN")
            exits += 1
            if run.exit_reason == kb.KVM_EXIT_HLT:
                break
        elapsed = time.perf_counter() - t0
        del run
        return elapsed, exits
    finally:
        g.close()


def run_vmm(kvm, code: bytes) -> tuple[float, int, int]:
    """The VMM's vCPU loop with a pio and an mmio Bus; (seconds, exits, writes seen by devices)."""
    from vmm.bus import Bus
    from vmm.vcpu import VcpuThread
    g = _Guest(kvm, code)
    try:
        pio, mmio = Bus("pio"), Bus("mmio")
        sink = _Sink()
        stopping = threading.Event()

        class Done:
            def read(self, offset: int, size: int) -> bytes:
                return bytes(size)

            def write(self, offset: int, data: bytes) -> None:
                stopping.set()       # the loop sees it at the guest's HLT exit, and returns

        pio.insert(COUNT_PORT, 1, sink, "count")
        pio.insert(DONE_PORT, 1, Done(), "done")
        mmio.insert(MMIO_ADDR, 0x1000, sink, "count")
        thread = VcpuThread(g.vcpu, pio, mmio, g.memory, lambda stop: stopping.set(), stopping)
        t0 = time.perf_counter()
        thread.run()                 # in this thread: no thread start-up in the measurement
        elapsed = time.perf_counter() - t0
        return elapsed, thread.exits, sink.writes
    finally:
        g.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exits", type=int, default=20000, help="writes per guest run (<= 65535)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    if not 1 <= args.exits <= 0xFFFF:
        p.error("--exits must be in 1..65535 (the guest counts in CX)")
    from kvm_sys import Kvm
    out: dict[str, dict] = {}
    with Kvm() as kvm:
        for kind, code in (("pio", pio_code(args.exits)), ("mmio", mmio_code(args.exits))):
            ref, vmm = [], []
            for _ in range(args.runs):          # interleaved, so host noise hits both alike
                t, n = run_reference(kvm, code)
                ref.append(t / n)
                t, n, writes = run_vmm(kvm, code)
                if writes != args.exits:
                    raise SystemExit(f"{kind}: devices saw {writes} writes, expected {args.exits}")
                vmm.append(t / n)
            r, v = statistics.median(ref), statistics.median(vmm)
            out[kind] = {"reference_us_per_exit": r * 1e6, "vmm_us_per_exit": v * 1e6,
                         "overhead_us_per_exit": (v - r) * 1e6, "ratio": v / r}
    write_result("vcpu_exits", {"exits_per_run": args.exits, "runs": args.runs, **out})


if __name__ == "__main__":
    main()
