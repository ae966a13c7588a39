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
from pathlib import Path
from typing import Callable, Sequence

from devices.virtio.fs.options import FsOptions

from .config import Config, GuestConfig, KernelConfig, parse_shared_dir
from .console import ConsoleSink

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class BackendProcess:
    """`python -m vmm device fs` as a child process, with its socket and control socket in `workdir`.

    `spec` is a `--shared-dir` value (PATH:TAG[:key=value...]); it is parsed here too (same code as
    the child) so the guest side knows the tag.
    """

    def __init__(self, spec: str, workdir: Path, name: str | None = None, *, once: bool = False,
                 verbose: bool = False) -> None:
        self.spec = spec
        self.options: FsOptions = parse_shared_dir(spec)
        name = name or self.options.tag
        self.socket = workdir / f"{name}.sock"
        self.control = workdir / f"{name}-ctl.sock"
        self.log_path = workdir / f"{name}-backend.log"
        self.once = once
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> BackendProcess:
        args = [sys.executable, "-m", "vmm"] + (["-vv"] if self.verbose else ["-v"]) + [
            "device", "fs", "--socket", str(self.socket), "--shared-dir", self.spec,
            "--control", str(self.control)] + (["--once"] if self.once else [])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + timeout
        while not (self.socket.exists() and self.control.exists()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"back-end exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"back-end socket {self.socket} did not appear: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stats(self) -> dict:
        """The back-end's counters (the device's `fs:TAG` entry) over its control socket."""
        from .control import request
        reply = request(str(self.control), "stats")
        return reply["devices"][f"fs:{self.options.tag}"]

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return process_cpu_seconds(self.proc.pid)

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
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
                                     stderr=subprocess.STDOUT)
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
