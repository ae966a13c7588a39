"""The default fs device is a jailed child of the VMM (README "Sandbox"), seen from a booted guest.

While the guest works on the share, the test reads the jailed back-end from outside through
/proc (the way an operator would check it): reduced capabilities, no_new_privs, seccomp mode 2,
its root is the share. The counters the VMM reports come from the child. A child killed
mid-run ends the run with one line and the device-lost status; the VMM does not hang.
(That the child's filter refuses execve & co. is covered by tests/test_sandbox.py, which reads
the installed filter back, and tests/test_jail.py, which runs the refusals.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.e2e.helpers import assert_ok, share
from tests.test_sandbox import FS_CAPS, status
from vmm.control import request
from vmm.exit_status import EXIT_DEVICE_LOST


def _child_pid(ctl: str) -> int:
    return request(ctl, "stats")["devices"]["fs:share"]["sandbox"]["pid"]


def test_default_share_is_served_by_a_jailed_child(boot, tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    (root / "host.txt").write_bytes(b"written by the host\n")
    ctl = str(tmp_path / "ctl.sock")
    seen: dict = {}

    def on_line(line: bytes) -> None:
        if b"@@pyvmm step=4 " in line and not seen:     # mid-run: the guest wrote and read
            try:
                pid = _child_pid(ctl)
                seen["pid"] = pid
                seen["status"] = status(pid)
                seen["root"] = sorted(os.listdir(f"/proc/{pid}/root"))
                st = os.stat(f"/proc/{pid}/root")
                seen["root_id"] = (st.st_dev, st.st_ino)
            except Exception as exc:  # noqa: BLE001 - asserted below, not lost in a vCPU thread
                seen["error"] = repr(exc)

    m = "/mnt/share"
    r = boot("\n".join([f"write {m}/from-guest 8192 1", f"read {m}/from-guest",
                        f"read {m}/host.txt", f"stat {m}/missing expect=ENOENT",
                        f"mkdir {m}/dir", f"readdir {m}", "exit 0"]) + "\n",
             shares=(share(root),), control_path=ctl, on_line=on_line)
    assert_ok(r)
    assert "error" not in seen, seen.get("error")
    s = seen["status"]
    assert int(s["CapEff"], 16) == int(s["CapBnd"], 16) == FS_CAPS
    assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2"
    assert seen["root"] == ["from-guest", "host.txt"]         # "/" of the child is the share
    here = root.stat()
    assert seen["root_id"] == (here.st_dev, here.st_ino)
    assert (root / "from-guest").stat().st_size == 8192 and (root / "dir").is_dir()
    # the counters are the child's, with the in-process device's keys
    dev = r.device("share")
    raw = r.metrics["fs:share"]
    assert raw["sandbox"] == {"mode": "namespace", "pid": seen["pid"],
                              "relay_pid": raw["sandbox"]["relay_pid"]}
    assert dev.lookups_of("missing") == 1
    assert raw["ops"]["WRITE"] >= 1 and raw["ops"]["MKDIR"] == 1
    assert raw["requests"] == sum(raw["ops"].values())
    assert raw["virtio"]["chains"] == raw["requests"] and raw["virtio"]["invalid_chains"] == 0
    assert raw["vhost_user"]["activations"] == 1
    assert not Path(f"/proc/{seen['pid']}").exists()          # the child is gone with the VM


def test_killed_child_ends_the_run_with_one_line(boot, tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    ctl = str(tmp_path / "ctl.sock")
    killed: list[int] = []

    def on_line(line: bytes) -> None:
        if b"@@pyvmm step=2 " in line and not killed:
            pid = _child_pid(ctl)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    m = "/mnt/share"
    r = boot("\n".join([f"write {m}/a 10 1", f"read {m}/a", f"write {m}/b 10 2",
                        f"readdir {m}", "exit 0"]) + "\n",
             shares=(share(root),), control_path=ctl, on_line=on_line, timeout=300)
    assert killed
    assert r.exit_status == EXIT_DEVICE_LOST, r.message
    assert r.message == (f"sandboxed fs device 'share': the back-end child (pid {killed[0]}) "
                         "was killed by SIGKILL while the VM was running; the device needs a "
                         "reset")
