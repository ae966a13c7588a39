"""The vCPU run loop: one thread per vCPU, KVM_RUN, dispatch the (typed) exit to the buses.

Only configuration-space MMIO, the serial port, the i8042 and the ACPI PM port reach this loop;
virtqueue notifications go through ioeventfds and never stop a vCPU. Every exit that ends the VM
(reset, shutdown, emulation failure, failed entry, system event) is reported to the machine through
`on_stop`, which wakes the main thread; the loop itself only stops when the machine says so.
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from devices.memory import GuestMemoryAccess
from kvm_sys import (FailEntryExit, InternalErrorExit, IoExit, KvmError, MmioExit, SystemEventExit, Vcpu,
                     VcpuExit, exit_name)
from kvm_sys import bindings as kb

from .bus import Bus
from .diagnostics import describe_vcpu

logger = logging.getLogger(__name__)


class StopReason(enum.Enum):
    GUEST_RESET = "guest reset (i8042)"
    GUEST_POWEROFF = "guest power-off (ACPI S5)"
    SHUTDOWN = "triple fault / shutdown"
    INTERNAL_ERROR = "KVM internal error (emulation failure)"
    FAIL_ENTRY = "KVM failed to enter the guest"
    SYSTEM_EVENT = "KVM system event"
    VCPU_ERROR = "vCPU thread error"
    SIGNAL = "stopped by signal"
    TIMEOUT = "timed out"
    CONTROL = "stopped through the control socket"
    DEVICE_LOST = "a device back-end went away"


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    detail: str = ""


class VcpuThread(threading.Thread):
    """Runs one vCPU until the machine sets `stopping`, then returns."""

    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: Bus, memory: GuestMemoryAccess,
                 on_stop: Callable[[Stop], None], stopping: threading.Event):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=False)
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.memory = memory
        self.on_stop = on_stop
        self.stopping = stopping
        self.exits = 0
        #: Called when KVM_RUN fails with EFAULT; True means it fixed the cause (enter again).
        self.on_fault: Callable[[], bool] | None = None
        self.exit_reasons: collections.Counter[int] = collections.Counter()
        #: CPU time of this thread (KVM_RUN included: emulated guest code is kernel time), set on exit.
        self.cpu_s = 0.0

    def kick(self) -> None:
        """Make KVM_RUN return soon: immediate_exit covers the window before the ioctl is entered."""
        self.vcpu.set_immediate_exit(True)

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - a vCPU thread must report, never die silently
            logger.exception("vcpu%d: unexpected error", self.vcpu.index)
            self.on_stop(Stop(StopReason.VCPU_ERROR, f"vcpu{self.vcpu.index}: {exc}"))
        finally:
            self.cpu_s = time.thread_time()

    def _loop(self) -> None:
        vcpu = self.vcpu
        run = vcpu.run
        stopping = self.stopping
        reasons = self.exit_reasons
        while not stopping.is_set():
            try:
                ex = run()
            except InterruptedError:
                vcpu.set_immediate_exit(False)
                continue
            except KvmError as exc:
                # EAGAIN: an application processor waiting for INIT/SIPI was woken (KVM blocks it
                # in the kernel while it is uninitialized and returns EAGAIN): just enter again.
                if exc.errno == errno.EAGAIN:
                    continue
                # EFAULT: KVM could not get a page of a memory slot; a DAX window may repair it.
                if exc.errno == errno.EFAULT and self.on_fault is not None and self.on_fault():
                    continue
                raise
            self.exits += 1
            reasons[ex.reason] += 1
            if isinstance(ex, IoExit):
                self._handle_io(ex)
            elif isinstance(ex, MmioExit):
                self._handle_mmio(ex)
            else:
                stop = self._stop_for(ex)
                if stop is not None:
                    self.on_stop(stop)
                    return

    def _stop_for(self, ex: VcpuExit) -> Stop | None:
        """What an exit other than I/O means for the VM: None to enter the guest again."""
        who = f"vcpu{self.vcpu.index}"
        if ex.reason in (kb.KVM_EXIT_HLT, kb.KVM_EXIT_INTR):
            # HLT only exits without an in-kernel irqchip (ours has one): treat it as spurious.
            return None
        if ex.reason == kb.KVM_EXIT_SHUTDOWN:
            return Stop(StopReason.SHUTDOWN, f"{who}: KVM_EXIT_SHUTDOWN")
        if isinstance(ex, InternalErrorExit):
            return Stop(StopReason.INTERNAL_ERROR,
                        f"{who}: suberror {ex.suberror} data [{', '.join(hex(d) for d in ex.data)}]\n"
                        + describe_vcpu(self.vcpu, self.memory))
        if isinstance(ex, FailEntryExit):
            return Stop(StopReason.FAIL_ENTRY,
                        f"{who}: hardware reason {ex.hardware_entry_failure_reason:#x} on cpu {ex.cpu}\n"
                        + describe_vcpu(self.vcpu, self.memory))
        if isinstance(ex, SystemEventExit):
            return Stop(StopReason.SYSTEM_EVENT, f"{who}: type {ex.type}")
        return Stop(StopReason.VCPU_ERROR, f"{who}: unhandled exit reason {ex.reason}\n"
                    + describe_vcpu(self.vcpu, self.memory))

    def _handle_io(self, ex: IoExit) -> None:
        size, count, data, port = ex.size, ex.count, ex.data, ex.port
        if size not in (1, 2, 4) or len(data) != size * count:
            logger.warning("vcpu%d: malformed I/O exit (size %d, count %d)", self.vcpu.index, size, count)
            return
        if ex.is_out:
            if count == 1:
                self.pio.write(port, bytes(data))
                return
            for start in range(0, size * count, size):
                self.pio.write(port, bytes(data[start:start + size]))
        else:
            if count == 1:
                data[:] = self.pio.read(port, size)
                return
            for start in range(0, size * count, size):
                data[start:start + size] = self.pio.read(port, size)

    def _handle_mmio(self, ex: MmioExit) -> None:
        data = ex.data
        length = len(data)
        if not 1 <= length <= 8:
            logger.warning("vcpu%d: malformed MMIO exit at %#x (len %d)", self.vcpu.index, ex.address,
                        length)
            return
        if ex.is_write:
            self.mmio.write(ex.address, bytes(data))
        else:
            data[:] = self.mmio.read(ex.address, length)


MP_STATE_NAMES = {getattr(kb, n): n for n in dir(kb) if n.startswith("KVM_MP_STATE_")}


def describe_thread(t: VcpuThread) -> str:
    """One vCPU after it stopped: MP state, exit counts by reason, registers (for stuck guests)."""
    try:
        mp = MP_STATE_NAMES.get(t.vcpu.get_mp_state(), "?")
    except Exception as exc:  # noqa: BLE001
        mp = f"unavailable ({exc})"
    reasons = ", ".join(f"{exit_name(r)}={n}" for r, n in t.exit_reasons.most_common())
    return (f"vcpu{t.vcpu.index}: mp_state {mp}; {t.exits} exits ({reasons or 'none'}), "
            f"{t.cpu_s:.2f} s CPU\n"
            + describe_vcpu(t.vcpu, t.memory))
