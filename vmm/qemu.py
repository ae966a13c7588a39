"""Run the project guest under QEMU 7.2 (microvm) with vhost-user-fs back-ends: the reference peer.

QEMU is the vhost-user front-end nobody on this team wrote; running our back-end
(`python -m vmm device fs`) under it is the interop test, and the same set-up gives side-by-side
figures. The guest is exactly what `vmm run` boots: the project kernel, the agent script with
each share mounted at /mnt/<tag> first, in the same uncompressed initramfs and with the same
command line, built by `vmm.machine`'s own code (`Machine.initrd`, `Machine.build_cmdline`).

The QEMU command line is the one that works on kvm_pvm (shared/reference/qemu-on-this-platform.md):

    qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities,-apic -smp 1 -m 128M
      -M microvm,acpi=off,memory-backend=mem
      -object memory-backend-memfd,id=mem,size=128M,share=on
      -chardev socket,id=fs0,path=SOCK -device vhost-user-fs-device,chardev=fs0,tag=TAG
      -global virtio-mmio.force-legacy=false
      -kernel VMLINUX -initrd INITRD -append CMDLINE -nographic -no-reboot

- `-arch-capabilities` (QEMU aborts on MSR 0x10a otherwise) and `-apic` (the guest runs in PIC
  mode; with QEMU's in-kernel LAPIC enabled and LVT0 masked no interrupt would arrive);
- guest RAM is a shared memfd: the back-end maps it from the fd QEMU sends in SET_MEM_TABLE;
- microvm's virtio-mmio is legacy by default, vhost-user-fs needs virtio 1.0;
- microvm (acpi=off) announces its own `virtio_mmio.device=` entries, so the command line has none;
- microvm has no i8042, so the agent's reset does not end QEMU promptly: the host reads the
  agent's exit line from the console and then stops QEMU itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from devices.jail import _sys
from devices.virtio.fs.options import FsOptions

from .config import Config, GuestConfig, KernelConfig, parse_shared_dir
from .console import ConsoleSink

logger = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the thread that started it dies, so a test run
    killed with SIGKILL leaves no QEMU or virtiofsd spinning on the host (one kept ~40% of a core
    for 15 minutes after such a kill)."""
    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)

QEMU = "qemu-system-x86_64"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds_by_name(pid: int, comm: str) -> float | None:
    """CPU seconds of the threads of process `pid` whose OS name (/proc/PID/task/TID/comm) is
    `comm` (a device's queue thread and its pool threads share one), summed from their schedstat
    (ns, run time on the CPU); None if there is no such thread."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total: float | None = None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().rstrip("\n") != comm:
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total = (total or 0.0) + int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return total


class _ServerProcess:
    """A vhost-user back-end child process listening on `self.socket` (in `workdir`)."""

    socket: Path
    log_path: Path
    options: FsOptions

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._log: BinaryIO | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        return self.socket.exists()

    def start(self, timeout: float = 30.0):
        for stale in (self.socket,):
            if stale.exists():
                stale.unlink()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command()[0]} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"back-end socket {self.socket} did not appear: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the whole back-end process (every thread)."""
        return process_cpu_seconds(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status (SIGKILL after `timeout`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BackendProcess(_ServerProcess):
    """`python -m vmm device fs` as a child process, with its socket and control socket in `workdir`.

    `share` is a `--shared-dir` value (PATH:TAG[:key=value...]), parsed here too (same code as the
    child) so the guest side knows the tag, or `FsOptions`, handed to the child as a one-device
    config file (so every option reaches it with its type).
    """

    def __init__(self, share: str | FsOptions, workdir: Path, name: str | None = None, *,
                 once: bool = False, verbose: bool = False) -> None:
        super().__init__()
        if isinstance(share, FsOptions):
            self.spec: str | None = None
            self.options = share
        else:
            self.spec = share
            self.options = parse_shared_dir(share)
        name = name or self.options.tag
        self.socket = workdir / f"{name}.sock"
        self.control = workdir / f"{name}-ctl.sock"
        self.config_path = workdir / f"{name}-backend.yaml"
        self.log_path = workdir / f"{name}-backend.log"
        self.once = once
        self.verbose = verbose

    def command(self) -> list[str]:
        if self.spec is not None:
            share = ["--shared-dir", self.spec]
        else:
            self.config_path.write_text(fs_device_yaml(self.options))
            share = ["--config", str(self.config_path)]
        return [sys.executable, "-m", "vmm"] + (["-vv"] if self.verbose else ["-v"]) + [
            "device", "fs", "--socket", str(self.socket), *share,
            # unjailed: the harness reads counters over --control and reconnects front-ends,
            # which a jailed back-end (one front-end, no sockets) cannot serve
            "--sandbox", "none",
            "--control", str(self.control)] + (["--once"] if self.once else [])

    def _ready(self) -> bool:
        return self.socket.exists() and self.control.exists()

    def start(self, timeout: float = 30.0) -> BackendProcess:
        if self.control.exists():
            self.control.unlink()
        return super().start(timeout)

    def stats(self) -> dict:
        """The back-end's counters (the device's `fs:TAG` entry) over its control socket."""
        from .control import request
        reply = request(str(self.control), "stats")
        return reply["devices"][f"fs:{self.options.tag}"]

    def worker_cpu_seconds(self) -> float | None:
        """CPU seconds of the device's queue worker thread (named pyvmm-fs-TAG), if running."""
        from devices.virtio.fs.worker import os_thread_name
        return thread_cpu_seconds_by_name(self.pid, os_thread_name(self.options.tag))


def fs_device_yaml(options: FsOptions) -> str:
    """A config file with `options` as its one `type: fs` device (fields left at their default
    are left out, so the file stays readable and parses with the same rules as a user's)."""
    import dataclasses

    import yaml

    device: dict = {"type": "fs"}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in ("source", "tag") or f.default is dataclasses.MISSING or value != f.default:
            device[f.name] = value
    return yaml.safe_dump({"devices": [device]}, sort_keys=False)


VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: Our cache modes in virtiofsd's words.
VIRTIOFSD_CACHE = {"never": "none", "auto": "auto", "always": "always"}


class VirtiofsdProcess(_ServerProcess):
    """C virtiofsd (QEMU 7.2's, `/usr/lib/qemu/virtiofsd`) serving `options.source` on a socket in
    `workdir`: the reference back-end. It runs as root in its own namespace sandbox, serves one
    front-end and exits when that one hangs up. Options it has no equivalent for (negative_timeout,
    trace) are refused rather than silently dropped; xattrs are on, as they are in our passthrough.
    `debug=True` adds `-d` (one log line per request: a census, but it costs CPU per request)."""

    def __init__(self, options: FsOptions, workdir: Path, name: str | None = None, *,
                 debug: bool = False, binary: str = VIRTIOFSD) -> None:
        super().__init__()
        unsupported = [k for k in ("negative_timeout", "trace") if getattr(options, k)]
        if unsupported:
            raise ValueError(f"C virtiofsd has no equivalent of {', '.join(unsupported)}")
        self.options = options
        name = name or options.tag
        self.socket = workdir / f"{name}-virtiofsd.sock"
        self.log_path = workdir / f"{name}-virtiofsd.log"
        self.debug = debug
        self.binary = binary

    def command(self) -> list[str]:
        o = self.options
        cmd = [self.binary, f"--socket-path={self.socket}", "-o", f"source={o.source}",
               "-o", f"cache={VIRTIOFSD_CACHE[o.cache]}", "-o", "xattr"]
        if o.cache != "never":
            cmd += ["-o", f"timeout={o.timeout:g}"]
        if o.writeback:
            cmd += ["-o", "writeback"]
        if self.debug:
            cmd.append("-d")
        return cmd

    def request_census(self) -> dict[str, int]:
        """Requests per opcode from a `-d` log (`opcode: NAME ...` lines), e.g. {"LOOKUP": 12}."""
        import re
        counts: dict[str, int] = {}
        for m in re.finditer(r"opcode: (\w+)", self.log_path.read_text(errors="replace")):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts


def guest_files(script: str, shares: Sequence[FsOptions], workdir: Path,
                extra_cmdline: str = "") -> tuple[Path, str]:
    """(initrd path, kernel command line) for `script` with `shares` mounted, built by the same
    code as `vmm run`. The command line has no virtio_mmio.device= entries (microvm adds its own)."""
    from .machine import Machine

    config = Config(kernel=KernelConfig(cmdline=extra_cmdline), guest=GuestConfig(script=script),
                    devices=tuple(shares))
    machine = Machine(config)
    initrd = workdir / "initrd.cpio"
    initrd.write_bytes(machine.initrd() or b"")
    return initrd, machine.build_cmdline([], acpi=False)


def qemu_command(kernel: Path, initrd: Path, cmdline: str, sockets: Sequence[tuple[Path, str]], *,
                 memory_mib: int = 128, vcpus: int = 1, qemu: str = QEMU) -> list[str]:
    """The microvm command line with one vhost-user-fs device per (socket, tag)."""
    mem = f"{memory_mib}M"
    cmd = [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities,-apic", "-smp", str(vcpus), "-m", mem,
           "-M", "microvm,acpi=off,memory-backend=mem",
           "-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]
    for i, (sock, tag) in enumerate(sockets):
        cmd += ["-chardev", f"socket,id=fs{i},path={sock}",
                "-device", f"vhost-user-fs-device,chardev=fs{i},tag={tag}"]
    cmd += ["-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline, "-nographic", "-no-reboot"]
    return cmd


class QemuGuest:
    """One QEMU microvm running the agent `script` with the back-ends' shares mounted."""

    def __init__(self, kernel: Path, script: str, backends: Sequence[BackendProcess], workdir: Path, *,
                 memory_mib: int = 128, on_line: Callable[[bytes], None] | None = None,
                 qemu: str = QEMU) -> None:
        self.backends = list(backends)
        initrd, self.cmdline = guest_files(script, [b.options for b in self.backends], workdir)
        self.command = qemu_command(kernel, initrd, self.cmdline, [(b.socket, b.options.tag) for b in self.backends],
                                    memory_mib=memory_mib, qemu=qemu)
        self.console_log = workdir / "qemu-console.log"
        self._exit_seen = threading.Event()
        self._user_on_line = on_line
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.sink: ConsoleSink | None = None

    def _on_line(self, line: bytes) -> None:
        if self._user_on_line is not None:
            self._user_on_line(line)
        if self.sink is not None and self.sink.parser.exit_status is not None:
            self._exit_seen.set()

    def start(self) -> QemuGuest:
        self._log = open(self.console_log, "wb")
        self.sink = ConsoleSink(self._log, on_line=self._on_line)
        self.started = time.monotonic()
        self.sink.start = self.started
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, name="qemu-console", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            data = os.read(fd, 4096)
            if not data:
                break
            self.sink(data)  # type: ignore[misc]
        self.sink.flush()  # type: ignore[union-attr]
        self._exit_seen.set()  # QEMU is gone: nothing more will come

    @property
    def parser(self):
        assert self.sink is not None
        return self.sink.parser

    @property
    def output(self) -> str:
        return self.console_log.read_text(errors="replace")

    def wait_exit_line(self, timeout: float) -> int:
        """The agent's exit status, once its exit line is on the console."""
        if not self._exit_seen.wait(timeout):
            raise TimeoutError(f"no agent exit line within {timeout:g} s:\n{self.output[-3000:]}")
        status = self.parser.exit_status
        if status is None:
            raise RuntimeError(f"QEMU ended (status {self.proc.poll() if self.proc else None}) without "
                               f"an agent exit line:\n{self.output[-3000:]}")
        return status

    @property
    def timings(self) -> dict[str, float]:
        assert self.sink is not None
        t = {}
        if self.sink.first_agent_line_at is not None:
            t["to_agent_s"] = self.sink.first_agent_line_at - self.started
        if self.sink.exit_line_at is not None:
            t["to_exit_line_s"] = self.sink.exit_line_at - self.started
        return t

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """End QEMU (SIGTERM: a clean shutdown that stops the vhost-user rings; SIGKILL: a crash)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> QemuGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
