"""The vCPU run loop: one thread per vCPU, KVM_RUN, decode the exit, dispatch to the buses.

Only configuration-space MMIO, the serial port, the i8042 and the ACPI PM port reach this loop;
virtqueue notifications go through ioeventfds and never stop a vCPU. Every exit that ends the VM
(reset, shutdown, emulation failure, failed entry, system event) is reported to the machine through
`on_stop`, which wakes the main thread; the loop itself only stops when the machine says so.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import enum
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from kvm_sys import KvmError, Vcpu
from kvm_sys import bindings as kb

from .bus import Bus
from .diagnostics import describe_vcpu

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    detail: str = ""


def _field_offset(struct_type: type, *path: str) -> int:
    """Offset of a (possibly nested, possibly anonymous-union) field, from the generated bindings."""
    offset = 0
    t = struct_type
    for name in path:
        fld = getattr(t, name)
        offset += fld.offset
        t = dict((f[0], f[1]) for f in t._fields_)[name]
    return offset


class _RunLayout:
    """Byte offsets into `struct kvm_run`, taken from the generated ctypes so they cannot drift."""

    def __init__(self) -> None:
        run = kb.kvm_run
        self.exit_reason = run.exit_reason.offset
        self.immediate_exit = run.immediate_exit.offset
        union = self._union_offset(run)
        self.io_direction = union + 0
        self.io_size = union + 1
        self.io_port = union + 2
        self.io_count = union + 4
        self.io_data_offset = union + 8
        self.mmio_phys = union + 0
        self.mmio_data = union + 8
        self.mmio_len = union + 16
        self.mmio_is_write = union + 20
        self.internal_suberror = union + 0
        self.internal_ndata = union + 4
        self.internal_data = union + 8
        self.fail_reason = union + 0
        self.fail_cpu = union + 8
        self.system_event_type = union + 0
        self._check(run, union)

    @staticmethod
    def _union_offset(run: type) -> int:
        # The exit union is the first field after `apic_base` (UAPI layout: offset 32 on x86_64).
        return run.apic_base.offset + ctypes.sizeof(ctypes.c_uint64)

    @staticmethod
    def _check(run: type, union: int) -> None:
        """Cross-check our union-relative offsets against the generated member structs."""
        io = _find_member_type(run, "io")
        mmio = _find_member_type(run, "mmio")
        if io is None or mmio is None:
            raise RuntimeError("kvm_sys.bindings: kvm_run has no io/mmio exit members")
        if (io.port.offset, io.data_offset.offset) != (2, 8) or \
                (mmio.len.offset, mmio.is_write.offset) != (16, 20):
            raise RuntimeError("kvm_sys.bindings: kvm_run exit layout differs from vmm/vcpu.py")


def _find_member_type(run: type, member: str) -> type | None:
    for _name, ftype, *_ in run._fields_:
        if issubclass(ftype, ctypes.Union):
            for uname, utype, *_ in ftype._fields_:
                if uname == member:
                    return utype
    return None


LAYOUT: _RunLayout | None = None


def run_layout() -> _RunLayout:
    global LAYOUT
    if LAYOUT is None:
        LAYOUT = _RunLayout()
    return LAYOUT


class VcpuThread(threading.Thread):
    """Runs one vCPU until the machine sets `stopping`, then returns."""

    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: Bus, memory, on_stop: Callable[[Stop], None],
                 stopping: threading.Event):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=False)
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.memory = memory
        self.on_stop = on_stop
        self.stopping = stopping
        self.exits = 0
        self.exit_reasons: collections.Counter[int] = collections.Counter()
        size = ctypes.sizeof(kb.kvm_run)
        mmap_size = getattr(vcpu, "mmap_size", size)
        # A byte view over the whole shared kvm_run mapping (the PIO data page lies beyond the struct).
        self._run = memoryview((ctypes.c_ubyte * mmap_size).from_address(
            ctypes.addressof(vcpu.run_struct))).cast("B")
        self._lay = run_layout()

    def kick(self) -> None:
        """Make KVM_RUN return soon: immediate_exit covers the window before the ioctl is entered."""
        self._run[self._lay.immediate_exit] = 1

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - a vCPU thread must report, never die silently
            log.exception("vcpu%d: unexpected error", self.vcpu.index)
            self.on_stop(Stop(StopReason.VCPU_ERROR, f"vcpu{self.vcpu.index}: {exc}"))
        finally:
            self._run.release()

    def _loop(self) -> None:
        lay = self._lay
        run = self._run
        u32 = struct.Struct("<I").unpack_from
        exit_io = kb.KVM_EXIT_IO
        exit_mmio = kb.KVM_EXIT_MMIO
        while not self.stopping.is_set():
            try:
                self.vcpu.run()
            except InterruptedError:
                run[lay.immediate_exit] = 0
                continue
            except KvmError as exc:
                # EAGAIN: an application processor waiting for INIT/SIPI was woken (KVM blocks it
                # in the kernel while it is uninitialized and returns EAGAIN): just enter again.
                if exc.errno == errno.EAGAIN:
                    continue
                raise
            self.exits += 1
            reason = u32(run, lay.exit_reason)[0]
            self.exit_reasons[reason] += 1
            if reason == exit_io:
                self._handle_io()
            elif reason == exit_mmio:
                self._handle_mmio()
            elif reason == kb.KVM_EXIT_HLT:
                # Only without an in-kernel irqchip; ours has one, so treat as a spurious exit.
                continue
            elif reason == kb.KVM_EXIT_INTR:
                continue
            elif reason == kb.KVM_EXIT_SHUTDOWN:
                self.on_stop(Stop(StopReason.SHUTDOWN, f"vcpu{self.vcpu.index}: KVM_EXIT_SHUTDOWN"))
                return
            elif reason == kb.KVM_EXIT_INTERNAL_ERROR:
                sub, ndata = struct.unpack_from("<II", run, lay.internal_suberror)
                data = struct.unpack_from(f"<{min(ndata, 16)}Q", run, lay.internal_data)
                detail = (f"vcpu{self.vcpu.index}: suberror {sub}"
                          f" data [{', '.join(hex(d) for d in data)}]\n"
                          + describe_vcpu(self.vcpu, self.memory))
                self.on_stop(Stop(StopReason.INTERNAL_ERROR, detail))
                return
            elif reason == kb.KVM_EXIT_FAIL_ENTRY:
                hw, cpu = struct.unpack_from("<QI", run, lay.fail_reason)
                self.on_stop(Stop(StopReason.FAIL_ENTRY,
                                  f"vcpu{self.vcpu.index}: hardware reason {hw:#x} on cpu {cpu}\n"
                                  + describe_vcpu(self.vcpu, self.memory)))
                return
            elif reason == kb.KVM_EXIT_SYSTEM_EVENT:
                kind = u32(run, lay.system_event_type)[0]
                self.on_stop(Stop(StopReason.SYSTEM_EVENT, f"vcpu{self.vcpu.index}: type {kind}"))
                return
            else:
                self.on_stop(Stop(StopReason.VCPU_ERROR,
                                  f"vcpu{self.vcpu.index}: unhandled exit reason {reason}\n"
                                  + describe_vcpu(self.vcpu, self.memory)))
                return

    def _handle_io(self) -> None:
        lay = self._lay
        run = self._run
        direction, size, port, count, data_offset = struct.unpack_from(
            "<BBHIQ", run, lay.io_direction)
        if size not in (1, 2, 4) or data_offset + size * count > len(run):
            log.warning("vcpu%d: malformed I/O exit (size %d, count %d)", self.vcpu.index, size, count)
            return
        if direction == kb.KVM_EXIT_IO_OUT:
            for i in range(count):
                start = data_offset + i * size
                self.pio.write(port, bytes(run[start:start + size]))
        else:
            for i in range(count):
                start = data_offset + i * size
                run[start:start + size] = self.pio.read(port, size)

    def _handle_mmio(self) -> None:
        lay = self._lay
        run = self._run
        phys, = struct.unpack_from("<Q", run, lay.mmio_phys)
        length, = struct.unpack_from("<I", run, lay.mmio_len)
        is_write = run[lay.mmio_is_write]
        if not 1 <= length <= 8:
            log.warning("vcpu%d: malformed MMIO exit (len %d)", self.vcpu.index, length)
            return
        if is_write:
            self.mmio.write(phys, bytes(run[lay.mmio_data:lay.mmio_data + length]))
        else:
            run[lay.mmio_data:lay.mmio_data + length] = self.mmio.read(phys, length)


EXIT_NAMES = {getattr(kb, n): n for n in dir(kb) if n.startswith("KVM_EXIT_") and
              isinstance(getattr(kb, n), int) and not n.startswith(("KVM_EXIT_IO_", "KVM_EXIT_HYPERV_",
                                                                     "KVM_EXIT_XEN_"))}
MP_STATE_NAMES = {getattr(kb, n): n for n in dir(kb) if n.startswith("KVM_MP_STATE_")}


def describe_thread(t: VcpuThread) -> str:
    """One vCPU after it stopped: MP state, exit counts by reason, registers (for stuck guests)."""
    try:
        mp = MP_STATE_NAMES.get(t.vcpu.get_mp_state(), "?")
    except Exception as exc:  # noqa: BLE001
        mp = f"unavailable ({exc})"
    reasons = ", ".join(f"{EXIT_NAMES.get(r, r)}={n}" for r, n in t.exit_reasons.most_common())
    return (f"vcpu{t.vcpu.index}: mp_state {mp}; {t.exits} exits ({reasons or 'none'})\n"
            + describe_vcpu(t.vcpu, t.memory))
