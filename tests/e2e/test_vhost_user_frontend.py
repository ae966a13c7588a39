"""Our VMM as a vhost-user front-end, with real processes on both sides of the socket.

`python -m vmm run --vhost-user-fs SOCKET:TAG` boots the project guest with a virtio-fs device whose
rings a separate back-end process serves (`python -m vmm device fs`). These tests kill one side
while the other runs: the VMM must end with one clear line and its own exit status when the
back-end dies, and the back-end must take the next VMM when the VMM dies. (The file operations
through vhost-user are in test_fs_ops.py with C virtiofsd and test_negative_timeout.py with ours.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from devices.virtio.vhost_user.frontend import VhostUserFsOptions
from guest.script import pattern
from tests.e2e.helpers import assert_ok
from vmm.exit_status import EXIT_DEVICE_LOST, EXIT_FAILURE
from vmm.qemu import BackendProcess

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 600  # bounds a hung guest; not a timing assertion


@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix="pyvmm-fe-e2e-"))  # short socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


class VmmProcess:
    """`python -m vmm run` as a child, its console read line by line on a thread."""

    def __init__(self, kernel: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmm", "run", str(REPO / "configs/default.yaml"), "--kernel", str(kernel),
             *args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, needle: bytes) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not any(needle in line for line in self.lines):
            assert self.proc.poll() is None, b"".join(self.lines[-30:]).decode(errors="replace")
            assert time.monotonic() < deadline, b"".join(self.lines[-30:]).decode(errors="replace")
            time.sleep(0.1)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode, err.decode(errors="replace")


def test_killing_the_backend_mid_run_ends_the_vm(kernel, workdir, tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    be = BackendProcess(f"{root}:share", workdir).start()
    try:
        vmm = VmmProcess(kernel, "--vhost-user-fs", f"{be.socket}:share",
                         "--exec", "write /mnt/share/f 4096 1; mark running; sleep 600000; exit 0")
        vmm.wait_for(b"name=running")
        os.kill(be.pid, signal.SIGKILL)       # no goodbye: the socket just closes
        be.proc.wait()
        status, err = vmm.finish()
    finally:
        be.stop()
    assert status == EXIT_DEVICE_LOST, err
    lines = err.strip().splitlines()
    want = f"pyvmm: vhost-user-fs back-end {be.socket}: the back-end closed the connection while the VM was running"
    assert lines[0] == want, err     # one line says what happened, before the usual summary
    assert lines[-1].startswith(f"pyvmm: exit status {EXIT_DEVICE_LOST} (a device back-end went away)")
    assert (root / "f").read_bytes() == pattern(4096, 1)


def test_killing_the_vmm_leaves_the_backend_ready(kernel, guest, workdir, tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    with BackendProcess(f"{root}:share", workdir) as be:
        vmm = VmmProcess(kernel, "--vhost-user-fs", f"{be.socket}:share",
                         "--exec", "write /mnt/share/first 4096 1; mark running; sleep 600000; exit 0")
        vmm.wait_for(b"name=running")
        assert be.stats()["vhost_user"]["active"]
        vmm.proc.kill()                       # SIGKILL: no GET_VRING_BASE, no goodbye
        vmm.finish()
        deadline = time.monotonic() + 30
        while be.stats()["vhost_user"]["active"]:
            assert time.monotonic() < deadline, be.log_tail()
            time.sleep(0.1)
        assert be.alive(), be.log_tail()

        # The next VM (this time in-process) is served as if nothing had happened.
        r = guest.run("read /mnt/share/first\nwrite /mnt/share/second 8192 2\nexit 0\n",
                      shares=[VhostUserFsOptions(str(be.socket), "share")])
        assert_ok(r)
        assert int(r.steps_of("read")[0].extra["size"]) == 4096
        assert (root / "second").read_bytes() == pattern(8192, 2)
        vu = be.stats()["vhost_user"]
        # the clean VMM exit stopped the rings (GET_VRING_BASE) and hung up
        assert vu["connections"] == 2 and vu["activations"] == 2 and vu["device_stops"] == 2
        assert vu["closed_by_backend"] == 0 and not vu["active"]
        assert be.stop() == 0


def test_missing_or_refusing_backend_is_one_line(kernel, workdir, tmp_path):
    """No boot: the VMM connects while it assembles the VM, so it fails before the guest starts."""
    missing = workdir / "nobody.sock"
    vmm = VmmProcess(kernel, "--vhost-user-fs", f"{missing}:share", "--exec", "exit 0")
    status, err = vmm.finish()
    assert status == EXIT_FAILURE
    assert err.strip() == (f"pyvmm: error: vhost-user-fs back-end {missing}: cannot connect: "
                           "No such file or directory")
    root = tmp_path / "share"
    root.mkdir()
    with BackendProcess(f"{root}:share", workdir) as be:
        vmm = VmmProcess(kernel, "--vhost-user-fs", f"{be.socket}:data", "--exec", "exit 0")
        status, err = vmm.finish()
        assert status == EXIT_FAILURE
        assert err.strip() == (f"pyvmm: error: vhost-user-fs back-end {be.socket}: the back-end "
                               "serves tag 'share', the VM config says 'data'")
        assert be.alive()
