"""How a VM ends when it does not end by itself: signals, and a guest that cannot go on."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def start(kernel: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmm", "run", "configs/default.yaml",
                             "--kernel", str(kernel), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_a_running_guest(kernel, sig, status):
    proc = start(kernel, "--exec", "sleep 600000")
    try:
        for line in proc.stdout:                 # wait until the agent is running its script
            if "@@pyvmm start" in line:
                break
        else:
            pytest.fail(f"guest never started its script: {proc.stderr.read()[-2000:]}")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-2000:]
    assert f"stopped by signal ({sig.name})" in err
    assert "mp_state" in err                     # each vCPU's state at the stop is reported
    assert "Traceback" not in err


def tiny_elf(code: bytes, entry: int = 0x1000000) -> bytes:
    """A one-segment ELF64 'kernel' whose entry point is `code`."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, entry, entry, len(code), len(code), 0x1000)
    return ehdr + phdr + code


def test_guest_that_cannot_go_on_is_reported(tmp_path):
    """An int3 with no IDT: hardware KVM triple-faults (KVM_EXIT_SHUTDOWN); kvm_pvm's emulator
    refuses int3 (KVM_EXIT_INTERNAL_ERROR). Either way the VM ends with a clear report."""
    kernel = tmp_path / "int3.elf"
    # out 0x3f8 'K' (proves our code ran), then int3.
    kernel.write_bytes(tiny_elf(b"\x66\xba\xf8\x03\xb0K\xee\xcc\xeb\xfe"))
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "configs/default.yaml",
                        "--kernel", str(kernel)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.startswith("K")
    if r.returncode == 111:
        assert "emulation failure" in r.stderr and "bytes at rip: cc eb fe" in r.stderr
        assert "rip=0x0000000001000007" in r.stderr
    else:
        assert r.returncode == 112, r.stderr
        assert "triple fault" in r.stderr


def test_terminal_mode_is_restored_after_a_run(kernel):
    """With a TTY on stdin the console is interactive (cbreak mode, keys go to COM1); whatever
    happens, the terminal's settings are back as they were when the VMM exits."""
    import os
    import termios
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        metrics = Path(tempfile.mkdtemp()) / "m.json"
        proc = subprocess.Popen([sys.executable, "-m", "vmm", "run", "configs/default.yaml",
                                 "--kernel", str(kernel), "--exec",
                                 "ttyread 11 60000; exit 5",
                                 "--metrics", str(metrics)],
                                cwd=REPO, stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if "ttyread open" in line:   # echoed by the agent: the guest's tty is open now
                break
        during = termios.tcgetattr(slave)
        os.write(master, b"typed keys\n")        # the agent reads them from /dev/console
        out, err = proc.communicate(timeout=180)
        after = termios.tcgetattr(slave)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 5, err[-2000:]
    assert during[3] & termios.ICANON == 0 and during[3] & termios.ECHO == 0
    assert after == before
    # The keys reached the guest: its 8250 driver read every byte out of the UART, and its tty
    # gave them to the agent's read of /dev/console.
    console = json.loads(metrics.read_text())["devices"]["serial:com1"]
    assert console["rx_queued"] == len(b"typed keys\n") == console["rx_delivered"]
    assert "op=ttyread result=ok errno=0" in out and "bytes=11 text=typed\\x20keys\\x0a" in out


def test_guest_kernel_panic_is_reported(kernel):
    """Without a script the agent stays idle and the kernel finds no init: it panics, reboots
    (panic=-1) and the VMM reports the panic line with its own status."""
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "configs/default.yaml",
                        "--kernel", str(kernel)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 110, r.stderr[-2000:]
    assert "pyvmm: guest kernel panic: Kernel panic - not syncing" in r.stderr
