"""A VMM killed with SIGKILL right after the guest synced leaves the file on the host's disk.

The share is ext4 on a loop device (tests/loopfs.py), so the test can tell "on the host file"
(in the host's page cache: survives the VMM, not a host crash) from "on disk" (in the image).
The share runs with ``writeback: true``, so the guest's page cache may hold written data until
it decides to send it. A real ``python -m vmm run`` process runs the agent script; the host
SIGKILLs it the moment the step line it waits for appears on the console, then looks at the
image.

The control is not "without fsync the file is incomplete": the agent's ``write`` closes its
file, and the guest's close (fuse_flush: write_inode_now, then FLUSH) sends every dirty page
before it returns, so the host *file* is complete either way. What fsync adds is the host's
disk, and that is what the control shows missing: killed right after the same write without
the fsync step, the data is on the host file but not in the image. Then the agent's own final
``sync`` (SYNCFS) is shown to reach the disk too: SYNCFS was answered ENOSYS before, and the
guest kernel then stops sending it at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guest.script import pattern
from tests.loopfs import blocks_on_disk, can_mount, ext4_on_loop

REPO = Path(__file__).resolve().parents[2]
SIZE = 512 << 10
SEED = 7
#: A bound on the whole guest run (boot about 3 s, the write a few seconds under emulation).
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root to mount a loop device")


@pytest.fixture
def disk(tmp_path):
    with ext4_on_loop(tmp_path) as (mnt, image):
        share = mnt / "share"
        share.mkdir()
        os.sync()  # mkfs and mkdir are on disk; what follows is the guest's
        yield share, image


def run_until(kernel: Path, share: Path, script: str, marker: str) -> list[str]:
    """Run the VMM on `script` and SIGKILL it as soon as a console line contains `marker`;
    returns the console lines seen."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmm", "run", "configs/default.yaml", "--kernel", str(kernel),
         "--exec", script, "--shared-dir", f"{share}:share:writeback=true"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the guest took too long"
        else:
            pytest.fail(f"never saw {marker!r}: {''.join(seen)[-2000:]}"
                        f"{proc.stderr.read()[-2000:] if proc.stderr else ''}")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the VMM ended before the kill"
    return seen


def _ok(seen: list[str], op: str) -> None:
    lines = [line for line in seen if f"op={op} " in line]
    assert lines and "result=ok" in lines[-1], "".join(seen)[-2000:]


def test_sigkill_right_after_fsync_leaves_the_file_on_disk(kernel, disk):
    share, image = disk
    data = pattern(SIZE, SEED)
    seen = run_until(kernel, share,
                     f"write /mnt/share/f {SIZE} {SEED}; fsync /mnt/share/f; sleep 60000",
                     "op=fsync ")
    _ok(seen, "fsync")
    assert (share / "f").read_bytes() == data
    assert blocks_on_disk(image, data) == 1


def test_control_without_fsync_the_data_is_on_the_host_file_but_not_on_disk(kernel, disk):
    share, image = disk
    data = pattern(SIZE, SEED)
    seen = run_until(kernel, share,
                     f"write /mnt/share/f {SIZE} {SEED}; mark written; sleep 60000",
                     "name=written")
    _ok(seen, "write")
    assert (share / "f").read_bytes() == data      # the guest's close() sent every page
    assert blocks_on_disk(image, data) == 0        # ...but nothing asked the host to keep it


def test_sigkill_right_after_the_agents_final_sync_leaves_the_file_on_disk(kernel, disk):
    share, image = disk
    data = pattern(SIZE, SEED)
    run_until(kernel, share, f"write /mnt/share/f {SIZE} {SEED}; exit 0",
              "@@pyvmm exit status=0")
    assert (share / "f").read_bytes() == data
    assert blocks_on_disk(image, data) == 1        # the agent's sync reached SYNCFS
