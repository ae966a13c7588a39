"""Assemble a VM from a Config, run it to the end, and tear everything down.

The order follows what KVM and Linux need: irqchip and PIT before vCPUs, memory slots before the
kernel is loaded, devices on the buses before the command line that announces them, CPU state last.
Every resource is registered with an ExitStack as it is created, so an error at any step (or
Ctrl-C) releases what was made so far: threads joined, eventfds and KVM fds closed, memory unmapped.
`_build` makes the whole VM without starting anything; `_run_vcpus` starts the vCPUs and waits for
the first stop request. Which process exit status a run gets is decided in vmm/exit_status.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from devices.acpi_pm import AcpiPmDevice
from devices.i8042 import I8042
from devices.serial import Serial
from devices.virtio.fs.dax import DaxWindow, HasDaxWindow, WindowFaults
from devices.virtio.fs.device import FsDevice
from devices.virtio.fs.options import FsOptions
from devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY, MmioTransport
from devices.virtio.vhost_user.frontend import VhostUserFsFrontend, VhostUserFsOptions
from kvm_sys import Kvm, Vm
from kvm_sys import bindings as kb
from guest.initramfs import build_initramfs

from . import layout
from .acpi import build_acpi_tables
from .boot import BootInfo, load_kernel
from .boot.cpu import configure_vcpu
from .bus import Bus
from .config import Config
from .console import ConsoleSink
from .exit_status import run_exit_status
from .memory import GuestMemory, guest_ram
from .vcpu import Stop, StopReason, VcpuThread, describe_thread

logger = logging.getLogger(__name__)

KVM_PVM_SYSFS = Path("/sys/module/kvm_pvm")

BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
# kvm_pvm runs guest kernel code through KVM's instruction emulator, and the CPUID we set does not
# reach the guest: hide the features whose instructions the emulator refuses (see
# shared/reference/kvm-pvm-platform.md). `clearcpuid=` is read into a 128-byte buffer: keep it short.
#
# clocksource=kvm-clock: the guest sees the host's invariant-TSC flags, so Linux lowers kvm-clock's
# rating and switches to `tsc` once it is calibrated, well after SMP bring-up. Each switch is a
# stop_machine() over every vCPU; with 8 emulated vCPUs on 2 host cores that rendezvous stalled
# for the whole 600 s timeout (vCPUs found in multi_cpu_stop / stop_machine_yield). Staying on
# kvm-clock costs about 5% of guest speed in a stat probe (its reads take more emulated
# instructions than rdtsc), the price of boots that finish.
#
# erms,fsrm: without them the kernel copies and clears memory with `rep movsq`/`stosq` instead of
# `rep movsb`: the emulator runs a rep instruction one element per step, so 8 bytes a step instead
# of 1 (a 16 MiB write + read in the guest: 52 + 92 s -> 25 + 61 s; guest uptime at the agent's
# start 12.2 -> 9.9 s).
# The buffer limit above: keep this list under 127 characters.
KVM_PVM_CMDLINE = ("noxsave clearcpuid=cx16,popcnt,rdrand,rdseed,fsgsbase,rdpid,smap,smep,pcid,"
                   "invpcid,bmi1,bmi2,movbe,erms,fsrm mitigations=off nopti clocksource=kvm-clock")
SCRIPT_PATH = "pyvmm/script"
# The window size as the kernel's memparse() reads it in virtio_mmio.device=<size>@<base>:<irq>.
VIRTIO_MMIO_CMDLINE_SIZE = (f"{layout.VIRTIO_MMIO_SIZE // layout.KiB}K"
                            if layout.VIRTIO_MMIO_SIZE % layout.KiB == 0 else str(layout.VIRTIO_MMIO_SIZE))


@dataclass
class RunResult:
    exit_status: int
    stop: Stop
    agent_status: int | None
    console: ConsoleSink
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    message: str = ""
    cmdline: str = ""

    @property
    def steps(self):
        return self.console.parser.steps


@dataclass
class _Built:
    """What `Machine._build` made and `Machine._run_vcpus` needs (everything else lives on the stack)."""

    threads: list[VcpuThread]
    sink: ConsoleSink
    serial: Serial


def on_kvm_pvm() -> bool:
    return KVM_PVM_SYSFS.exists()


def mount_lines(config: Config) -> str:
    """Every share is mounted at /mnt/<tag> before the user's script runs (a DAX share with
    dax=always, so its files are read through the window)."""
    return "".join(f"mount {dev.tag} /mnt/{dev.tag}{' dax=always' if wants_dax(dev) else ''}\n"
                   for dev in config.devices)


def wants_dax(options: object) -> bool:
    """A `type: fs` device with a DAX window (it needs the `dax` guest kernel variant)."""
    return isinstance(options, FsOptions) and options.dax


def agent_script(config: Config) -> str | None:
    if config.guest.script is None and not config.devices:
        return None
    return mount_lines(config) + (config.guest.script or "exit 0\n")


class Machine:
    def __init__(self, config: Config, *, output: BinaryIO | None = None,
                 control_path: str | None = None, kernel_progress: Callable[[str], None] | None = None):
        self.config = config
        self.output = output if output is not None else sys.stdout.buffer
        self.control_path = control_path
        self.kernel_progress = kernel_progress
        self._stop_lock = threading.Lock()
        self._stop: Stop | None = None
        self._stop_event = threading.Event()
        self.stopping = threading.Event()
        self.fs_devices: list[FsDevice | VhostUserFsFrontend] = []
        self.serial: Serial | None = None   # COM1, once built (its input counters are reported)
        self.vcpu_report = ""
        self.cmdline = ""
        self.on_console_line: Callable[[bytes], None] | None = None   # tests watch the console
        self._dax_windows: list[DaxWindow] = []   # of each fs device with dax: true

    # ------------------------------------------------------------------ stop requests
    def request_stop(self, stop: Stop) -> None:
        """First reason wins; wakes the main thread."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = stop
                logger.debug("stop requested: %s %s", stop.reason.value, stop.detail)
        self._stop_event.set()

    # ------------------------------------------------------------------ metrics
    def device_metrics(self) -> dict:
        metrics: dict = {f"fs:{dev.options.tag}": dev.metrics() for dev in self.fs_devices}
        if self.serial is not None:
            metrics["serial:com1"] = self.serial.input_counters()
        return metrics

    def reset_metrics(self) -> None:
        for dev in self.fs_devices:
            dev.reset_metrics()

    # ------------------------------------------------------------------ run
    def kernel_path(self) -> Path:
        if self.config.kernel.path != "auto":
            return Path(self.config.kernel.path)
        from guest.build import ensure_kernel   # lazy: only `auto` needs the builder
        variant = "dax" if any(wants_dax(d) for d in self.config.devices) else None
        return ensure_kernel(progress=self.kernel_progress, variant=variant)

    def uses_acpi(self) -> bool:
        """ACPI tables are written when devices are announced through them, for SMP (the MADT
        lists the CPUs) and always on kvm_pvm; otherwise the guest boots with acpi=off.

        On kvm_pvm a guest without ACPI has no I/O APIC and runs its local APIC, if any, in
        virtual-wire mode behind the 8259 PIC, and there an emulated `hlt` does not block: an idle
        1-vCPU guest kept its vCPU thread at 100% of a host core (10 s of `sleep` cost 10.4 s of
        vCPU CPU; `lapic` on the command line, or KVM_MP_STATE_HALTED set from user space, changed
        nothing), taking the core from the device worker serving it. With the MADT's I/O APIC
        the same guest idles (10 s of `sleep`: about 0.5 s of vCPU CPU) and ticks from its local
        APIC timer; parsing the tables costs well under a second of boot here. On hardware KVM
        `hlt` blocks either way, and a 1-vCPU guest keeps the faster acpi=off boot."""
        return (self.config.vm.discovery in ("acpi", "both") or self.config.vm.vcpus > 1
                or on_kvm_pvm())

    def build_cmdline(self, devices: list[tuple[int, int]], acpi: bool = False) -> str:
        parts = [BASE_CMDLINE]
        if not acpi:
            parts.append("acpi=off")
        if on_kvm_pvm():
            logger.debug("kvm_pvm detected: adding %s", KVM_PVM_CMDLINE)
            parts.append(KVM_PVM_CMDLINE)
        if self.config.vm.discovery in ("cmdline", "both"):
            parts += [f"virtio_mmio.device={VIRTIO_MMIO_CMDLINE_SIZE}@{base:#x}:{gsi}"
                      for base, gsi in devices]
        if self.config.kernel.cmdline:
            parts.append(self.config.kernel.cmdline)
        return " ".join(parts)

    def initrd(self) -> bytes | None:
        script = agent_script(self.config)
        user = self.config.kernel.initrd.read_bytes() if self.config.kernel.initrd else b""
        if script is None:
            return user or None
        # cpio archives may be concatenated; each must start 4-byte aligned.
        pad = (-len(user)) % 4
        return user + b"\0" * pad + build_initramfs({SCRIPT_PATH: script.encode()})

    def run(self) -> RunResult:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Machine.run() must be called from the main thread (it handles signals)")
        started = time.monotonic()
        kernel = self.kernel_path()
        timings: dict[str, float] = {"kernel_ready_s": time.monotonic() - started}
        with contextlib.ExitStack() as stack:
            built = self._build(stack, kernel)
            self._run_vcpus(stack, built, started, timings)
            stop = self._stop or Stop(StopReason.VCPU_ERROR, "no stop reason")
            metrics = self.device_metrics()
        timings["total_s"] = time.monotonic() - started
        return self._result(stop, built.sink, metrics, timings)

    def _build(self, stack: contextlib.ExitStack, kernel: Path) -> _Built:
        """Create the VM, its memory, devices and vCPUs (not started), each resource on `stack`."""
        cfg = self.config
        kvm = stack.enter_context(Kvm())
        vm = kvm.create_vm()
        stack.callback(vm.close)
        vm.set_tss_addr(layout.TSS_ADDR)
        vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2(kb.KVM_PIT_SPEAKER_DUMMY)

        # RAM is a shareable memfd only when another process must map it: a vhost-user back-end
        # or a sandboxed fs device's child (see guest_ram).
        memory = guest_ram(cfg.vm.memory_mib << 20, shared=cfg.shares_guest_memory)
        stack.callback(memory.close)
        memory.register(vm)

        pio = Bus("pio")
        mmio = Bus("mmio")
        sink, serial = self._add_legacy_devices(stack, vm, pio)
        announced = self._add_fs_devices(stack, vm, memory, mmio)
        rsdp = self._add_acpi(memory, pio, announced)
        self.cmdline = self.build_cmdline(announced, acpi=rsdp is not None)
        boot = load_kernel(memory, kernel, self.cmdline, self.initrd(), acpi_rsdp=rsdp)
        logger.debug("kernel %s (%s) entry %#x cmdline: %s", kernel, boot.kind, boot.entry, self.cmdline)
        threads = self._add_vcpus(stack, kvm, vm, memory, pio, mmio, boot)
        return _Built(threads=threads, sink=sink, serial=serial)

    def _run_vcpus(self, stack: contextlib.ExitStack, built: _Built, started: float,
                   timings: dict[str, float]) -> None:
        """Start the vCPUs, wait for the first stop request, stop them, record timings."""
        threads, sink = built.threads, built.sink
        stack.enter_context(self._signals())
        # Registered after the signal handlers so it runs before they are restored: the SIGUSR1
        # kick must never meet the default action (which would kill the VMM).
        stack.callback(self._stop_threads, threads)
        if self.control_path:
            from .control import ControlServer
            stack.enter_context(ControlServer(self.control_path, self))
        stack.enter_context(self._stdin_to(built.serial))
        sink.start = started
        timings["setup_s"] = time.monotonic() - started
        for t in threads:
            t.start()
        self._wait(self.config.guest.timeout, sink)
        sink.flush()
        self._stop_threads(threads)
        timings["exits"] = sum(t.exits for t in threads)
        timings["vcpu_cpu_s"] = sum(t.cpu_s for t in threads)
        if self._stop is not None and self._stop.reason in (StopReason.TIMEOUT, StopReason.SIGNAL,
                                                            StopReason.CONTROL):
            # A guest that had to be stopped from outside: say where each vCPU was.
            self.vcpu_report = "\n".join(describe_thread(t) for t in threads)
            logger.warning("vCPU state at stop:\n%s", self.vcpu_report)
        if sink.first_agent_line_at is not None:
            timings["to_agent_s"] = sink.first_agent_line_at - started
        if sink.exit_line_at is not None:
            timings["to_exit_line_s"] = sink.exit_line_at - started

    def _add_legacy_devices(self, stack: contextlib.ExitStack, vm: Vm, pio: Bus
                            ) -> tuple[ConsoleSink, Serial]:
        """COM1 (the console, with its sink) and the i8042 reset line."""
        log_file = None
        if self.config.serial.log is not None:
            log_file = stack.enter_context(open(self.config.serial.log, "ab"))
        sink = ConsoleSink(self.output, log_file, on_line=self.on_console_line)

        def pulse_com1_irq() -> None:
            vm.irq_line(layout.COM1_IRQ, 1)
            vm.irq_line(layout.COM1_IRQ, 0)

        serial = Serial(sink, irq=pulse_com1_irq)
        self.serial = serial
        pio.insert(layout.COM1_PORT, layout.COM1_PORT_SIZE, serial, "com1")
        pio.insert(layout.I8042_DATA_PORT, layout.I8042_PORT_SIZE, I8042(
            lambda: self.request_stop(Stop(StopReason.GUEST_RESET))), "i8042")
        return sink, serial

    def _add_vcpus(self, stack: contextlib.ExitStack, kvm: Kvm, vm: Vm, memory: GuestMemory,
                   pio: Bus, mmio: Bus, boot: BootInfo) -> list[VcpuThread]:
        supported_cpuid = kvm.get_supported_cpuid()
        threads: list[VcpuThread] = []
        for index in range(self.config.vm.vcpus):
            vcpu = vm.create_vcpu(index)
            stack.callback(vcpu.close)
            configure_vcpu(vcpu, supported_cpuid, index, self.config.vm.vcpus, boot)
            threads.append(VcpuThread(vcpu, pio, mmio, memory, self.request_stop, self.stopping))
            if self._dax_windows:
                threads[-1].on_fault = self._repair_dax_fault
        return threads

    def _add_fs_devices(self, stack: contextlib.ExitStack, vm: Vm, memory: GuestMemory, mmio: Bus
                        ) -> list[tuple[int, int]]:
        announced = []
        for i, options in enumerate(self.config.devices):
            base = layout.virtio_mmio_addr(i)
            gsi = layout.virtio_gsi(i)
            irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            stack.callback(os.close, irq_fd)
            vm.irqfd(irq_fd, gsi)
            stack.callback(vm.irqfd, irq_fd, gsi, deassign=True)
            device = self._make_fs_device(stack, options, memory)
            transport = MmioTransport(device, memory, irq_fd)
            stack.callback(transport.close)
            for q, efd in enumerate(transport.queue_events):
                vm.ioeventfd(efd, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, datamatch=q)
                stack.callback(vm.ioeventfd, efd, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4,
                               datamatch=q, deassign=True)
            mmio.insert(base, layout.VIRTIO_MMIO_SIZE, transport, f"virtio-fs:{options.tag}")
            self.fs_devices.append(device)
            announced.append((base, gsi))
        self._add_dax_windows(stack, vm, memory, mmio)
        return announced

    def _add_dax_windows(self, stack: contextlib.ExitStack, vm: Vm, memory: GuestMemory,
                         mmio: Bus) -> None:
        """Each DAX window above RAM (vmm.layout), as its own KVM memory slot after RAM's."""
        placed = [(d, w) for d in self.fs_devices
                  if isinstance(d, HasDaxWindow) and (w := d.dax_window) is not None]
        if not placed:
            return
        ram_end = max(r.end for r in memory.regions)
        addrs = layout.dax_window_addrs(ram_end, [w.size for _, w in placed])
        for slot, ((device, window), gpa) in enumerate(zip(placed, addrs),
                                                       start=len(memory.regions)):
            vm.set_user_memory_region(slot, gpa, window.size, window.host_addr)
            # Removed before the transport closes (LIFO) and unmaps the window.
            stack.callback(vm.set_user_memory_region, slot, gpa, 0, window.host_addr)
            device.place_dax_window(gpa)
            # Accesses KVM cannot serve from the host mapping (emulated ones) exit as MMIO here.
            mmio.insert(gpa, window.size, WindowFaults(window, device.options.tag),
                        f"dax-window:{device.options.tag}")
            logger.debug("virtio-fs %s: DAX window [%#x, %#x) slot %d", device.options.tag, gpa,
                         gpa + window.size, slot)
        self._dax_windows = [w for _, w in placed]

    def _repair_dax_fault(self) -> bool:
        """A vCPU's KVM_RUN failed with EFAULT: if a DAX mapping reaches past a file truncated on
        the host, give it zero pages and let the vCPU go on (devices/virtio/fs/dax.py)."""
        return sum(w.repair_truncated() for w in self._dax_windows) > 0

    def _make_fs_device(self, stack: contextlib.ExitStack, options: FsOptions | VhostUserFsOptions,
                        memory: GuestMemory) -> FsDevice | VhostUserFsFrontend:
        """A virtio-fs device served here (`type: fs`), or a front-end for a back-end process
        (`type: vhost-user-fs`: connects and negotiates now, so a missing or refusing back-end
        ends the run before the guest starts, with one line naming its socket)."""
        if isinstance(options, FsOptions) and options.sandbox == "none":
            return FsDevice(options)
        device: VhostUserFsFrontend
        if isinstance(options, FsOptions):
            # sandbox: namespace|chroot -- a jailed child serves it over vhost-user (vmm/sandbox.py)
            from .sandbox import SandboxedFsDevice
            device = SandboxedFsDevice(options, memory, on_lost=self._backend_lost)
        else:
            device = VhostUserFsFrontend(options, memory, on_lost=self._backend_lost)
        stack.callback(device.close)   # also if the transport cannot be made (close is idempotent)
        return device

    def _backend_lost(self, message: str) -> None:
        """A vhost-user back-end went away mid-run (its monitor thread calls this): the guest's
        device is dead for good, so the run ends with the message and EXIT_DEVICE_LOST."""
        self.request_stop(Stop(StopReason.DEVICE_LOST, message))

    def _add_acpi(self, memory: GuestMemory, pio: Bus, announced: list[tuple[int, int]]) -> int | None:
        if not self.uses_acpi():
            return None
        described = []
        if self.config.vm.discovery in ("acpi", "both"):
            described = [(base, layout.VIRTIO_MMIO_SIZE, gsi) for base, gsi in announced]
        # i8042=False: our i8042 models only the reset line, so Linux must not probe a keyboard
        # controller (reboot=k writes port 0x64 directly and needs no driver).
        tables = build_acpi_tables(self.config.vm.vcpus, described, i8042=False)
        tables.write_to(memory)
        pio.insert(layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_SIZE, AcpiPmDevice(
            on_poweroff=lambda: self.request_stop(Stop(StopReason.GUEST_POWEROFF)),
            on_reset=lambda: self.request_stop(Stop(StopReason.GUEST_RESET))), "acpi-pm")
        return tables.rsdp_addr

    def _wait(self, timeout: float, sink: ConsoleSink) -> None:
        deadline = time.monotonic() + timeout
        while not self._stop_event.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self.request_stop(Stop(StopReason.TIMEOUT, f"no exit after {timeout:g} s"))

    def _stop_threads(self, threads: list[VcpuThread]) -> None:
        """Idempotent: called once the guest is done, and again by the ExitStack on errors."""
        self.stopping.set()
        for _ in range(200):
            alive = [t for t in threads if t.is_alive()]
            if not alive:
                return
            for t in alive:
                t.kick()
                if t.ident is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pthread_kill(t.ident, signal.SIGUSR1)
            for t in alive:
                t.join(0.05)
        logger.error("vCPU threads did not stop: %s", [t.name for t in threads if t.is_alive()])

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM stop the VM; SIGUSR1 (a no-op handler) interrupts KVM_RUN in vCPU threads."""
        def stop(signum, _frame):
            self.request_stop(Stop(StopReason.SIGNAL, signal.Signals(signum).name))
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: None)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def _stdin_to(self, serial: Serial):
        """Forward the host terminal to COM1 in cbreak mode (Ctrl-C still stops the VM)."""
        if not self.config.serial.stdin or not sys.stdin.isatty():
            yield
            return
        import termios
        import tty
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        stop_r, stop_w = os.pipe()
        import select

        def pump():
            while True:
                ready, _, _ = select.select([fd, stop_r], [], [])
                if stop_r in ready:
                    return
                data = os.read(fd, 256)
                if not data:
                    return
                serial.enqueue_input(data)

        tty.setcbreak(fd)
        t = threading.Thread(target=pump, name="stdin", daemon=True)
        t.start()
        try:
            yield
        finally:
            os.write(stop_w, b"x")
            t.join(1)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            os.close(stop_r)
            os.close(stop_w)

    # ------------------------------------------------------------------ result
    def _result(self, stop: Stop, sink: ConsoleSink, metrics: dict, timings: dict) -> RunResult:
        exit_status, message = run_exit_status(stop, sink.parser)
        return RunResult(exit_status=exit_status, stop=stop, agent_status=sink.parser.exit_status,
                         console=sink, metrics=metrics, timings=timings, message=message,
                         cmdline=self.cmdline)
