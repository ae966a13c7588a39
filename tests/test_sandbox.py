"""The sandboxed fs device without a guest: the `sandbox` key, `device fs --sandbox/--fd`, and the
VMM's jailed child (vmm/sandbox.py) checked from outside through /proc and ptrace.

The child is the real one the VMM starts (`python -m vmm device fs --fd N --stats-fd M ...`);
what it holds is read from /proc/PID of the jailed process, the way an operator would check it.
That its seccomp filter refuses execve, socket, ptrace, mount... is proven for the policy by
tests/test_jail.py (a jailed process tries them); here PTRACE_SECCOMP_GET_FILTER reads the filter
the real back-end child has installed and it must be exactly that policy's program, so the two
tests together cover the child. Needs root (the jail mounts and loads seccomp filters).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from devices.jail import capabilities, policy, seccomp
from devices.virtio.fs.options import FsOptions
from devices.virtio.vhost_user.protocol import Request
from tests.vhost_user_support import Frontend
from vmm.config import ConfigError, load_config, parse_shared_dir
from vmm.memory import guest_ram
from vmm.sandbox import BackendChild, SandboxedFsDevice, SandboxError, describe_status

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root (mounts, seccomp)")

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60          # a bound on waiting for a process, not a timing assertion
FS_CAPS = capabilities.mask_of(capabilities.FS_DEVICE_CAPS)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_text("hi\n")
    (d / "sub").mkdir()
    return d


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


# ------------------------------------------------------------------------------ configuration


def test_sandbox_key_default_and_choices(share, tmp_path):
    assert FsOptions(source=str(share), tag="t").sandbox == "namespace"
    assert parse_shared_dir(f"{share}:t").sandbox == "namespace"
    assert parse_shared_dir(f"{share}:t:sandbox=chroot").sandbox == "chroot"
    assert parse_shared_dir(f"{share}:t:sandbox=none").sandbox == "none"
    with pytest.raises(ConfigError, match=r"--shared-dir .*: sandbox: must be one of namespace, "
                                          r"chroot, none, got 'jail'"):
        parse_shared_dir(f"{share}:t:sandbox=jail")
    with pytest.raises(ValueError, match="sandbox must be one of"):
        FsOptions(source=str(share), tag="t", sandbox="off")

    cfg = tmp_path / "vm.yaml"
    devices = [{"type": "fs", "source": str(share), "tag": "a"},
               {"type": "fs", "source": str(share), "tag": "b", "sandbox": "none"}]
    cfg.write_text(yaml.safe_dump({"devices": devices}))
    c = load_config(cfg)
    assert [d.sandbox for d in c.devices] == ["namespace", "none"]
    assert [d.tag for d in c.sandboxed_devices] == ["a"]
    assert c.shares_guest_memory and not c.uses_vhost_user   # the child must map guest RAM

    devices[0]["sandbox"] = "none"
    cfg.write_text(yaml.safe_dump({"devices": devices}))
    assert not load_config(cfg).shares_guest_memory          # all in-process: anonymous RAM
    devices[0]["sandbox"] = "yes"
    cfg.write_text(yaml.safe_dump({"devices": devices}))
    with pytest.raises(ConfigError, match=r"devices\[0\]\.sandbox: must be one of namespace"):
        load_config(cfg)
    devices[0]["sandbox"] = True
    cfg.write_text(yaml.safe_dump({"devices": devices}))
    with pytest.raises(ConfigError, match=r"devices\[0\]\.sandbox: expected"):
        load_config(cfg)


def _device_fs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm", "device", "fs", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT_S)


def test_device_fs_cli_validation(share, tmp_path):
    r = _device_fs("--socket", str(tmp_path / "s"), "--shared-dir", f"{share}:t",
                   "--control", str(tmp_path / "c"))
    assert r.returncode == 2 and "--control needs --sandbox none" in r.stderr
    r = _device_fs("--shared-dir", f"{share}:t")
    assert r.returncode == 2 and "one of the arguments --socket --fd is required" in r.stderr
    r = _device_fs("--fd", "3", "--socket", "x", "--shared-dir", f"{share}:t")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = _device_fs("--fd", "3", "--shared-dir", f"{share}:t", "--sandbox", "cell")
    assert r.returncode == 2 and "invalid choice: 'cell'" in r.stderr
    r = _device_fs("--fd", "3", "--options-json", '{"source": "/nonexistent", "tag": "t"}')
    assert r.returncode == 2 and "--options-json: source '/nonexistent'" in r.stderr


# ------------------------------------------------------------------------------ the child


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_child_is_jailed_in_the_share_and_serves(share, mode):
    child = BackendChild(FsOptions(source=str(share), tag="t", sandbox=mode))
    try:
        pid = child.jailed_pid
        assert pid != child.pid                        # the relay waits outside the PID namespace
        s = status(pid)
        assert int(s["CapEff"], 16) == int(s["CapPrm"], 16) == int(s["CapBnd"], 16) == FS_CAPS
        assert int(s["CapInh"], 16) == int(s["CapAmb"], 16) == 0
        assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2" and s["Seccomp_filters"] == "1"
        assert s["NSpid"].split()[-1] == "1"           # PID 1 of its own namespace
        # its root is the share: the host tree is not in its view at all
        assert sorted(os.listdir(f"/proc/{pid}/root")) == ["hello.txt", "sub"]
        root, here = os.stat(f"/proc/{pid}/root"), share.stat()
        assert (root.st_dev, root.st_ino) == (here.st_dev, here.st_ino)
        # control: the same reads of this (unjailed) process give the host's view
        assert "etc" in os.listdir(f"/proc/{os.getpid()}/root")
        assert status(os.getpid())["Seccomp"] == "0"
        # a front-end on the socketpair gets answers from the jailed device
        assert child.vhost_sock is not None
        fe = Frontend(child.vhost_sock)
        assert fe.u64(Request.GET_QUEUE_NUM) == 2
        stats = child.request("stats")["metrics"]
        assert stats["vhost_user"]["messages"] == 1 and stats["requests"] == 0
        assert "lookups_by_name" in stats and "virtio" in stats
        child.request("reset")
        fe.conn.close()
        child.vhost_sock = None
        t0 = time.monotonic()
        code = child.close()                           # the session ended: a clean exit
        assert code == 0, (describe_status(code), f"after {time.monotonic() - t0:.1f} s")
    finally:
        child.kill()
        child.close()


def test_child_filter_is_the_reviewed_policy(share):
    """PTRACE_SECCOMP_GET_FILTER reads the BPF program the running child installed; it must be
    the one compiled from devices/jail/policy.py (whose refusals test_jail.py proves)."""
    child = BackendChild(FsOptions(source=str(share), tag="t"))
    try:
        got = _seccomp_filter(child.jailed_pid)
    finally:
        child.kill()
        child.close()
    want = seccomp.compile_filter(seccomp.rules_by_number(policy.FS_DEVICE),
                                  seccomp.ACTIONS["errno"])
    assert got == [tuple(i) for i in want]
    # and the policy keeps the dangerous calls out (what test_jail.py runs for real)
    assert not set(policy.NEVER) & set(policy.FS_DEVICE)


def _seccomp_filter(pid: int) -> list[tuple[int, int, int, int]]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SECCOMP_GET_FILTER = 16, 17, 0x420C
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "PTRACE_ATTACH")
    try:
        os.waitpid(pid, 0x40000000)                    # __WALL: the stop of the attach
        n = libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, None)
        if n < 0:
            raise OSError(ctypes.get_errno(), "PTRACE_SECCOMP_GET_FILTER")
        buf = (seccomp.SockFilter * n)()
        if libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, 0, ctypes.addressof(buf)) != n:
            raise OSError(ctypes.get_errno(), "PTRACE_SECCOMP_GET_FILTER")
        return [(f.code, f.jt, f.jf, f.k) for f in buf]
    finally:
        libc.ptrace(PTRACE_DETACH, pid, None, None)


def test_child_that_cannot_start_is_one_line(share, tmp_path):
    options = FsOptions(source=str(share), tag="t")
    share.rename(tmp_path / "gone")                  # the share vanished before the jail
    with pytest.raises(SandboxError) as e:
        BackendChild(options)
    text = str(e.value)
    assert "\n" not in text
    assert text == ("sandboxed fs device 't': the back-end exited with status 2 before serving: "
                    f"ConfigError: --options-json: source '{share}' is not an existing directory")


def test_child_death_is_reported_once_with_its_status(share):
    memory = guest_ram(64 << 20, shared=True)
    lost: list[str] = []
    done = threading.Event()

    def on_lost(message: str) -> None:
        lost.append(message)
        done.set()

    dev = SandboxedFsDevice(FsOptions(source=str(share), tag="t"), memory, on_lost=on_lost)
    try:
        assert dev.metrics()["sandbox"]["pid"] == dev.child.jailed_pid
        os.kill(dev.child.jailed_pid, signal.SIGKILL)
        assert done.wait(WAIT_S)
        assert len(lost) == 1 and "\n" not in lost[0]
        assert lost[0] == (f"sandboxed fs device 't': the back-end child (pid "
                           f"{dev.child.jailed_pid}) was killed by SIGKILL while the VM was "
                           "running; the device needs a reset")
        m = dev.metrics()                            # no child to ask: said, not raised
        assert m["error"].startswith("no counters from the sandboxed child")
        assert m["vhost_user_frontend"]["lost"]
    finally:
        started = time.monotonic()
        dev.close()
        memory.close()
    assert time.monotonic() - started < WAIT_S
    assert dev.child.proc.returncode == -signal.SIGKILL


def test_metrics_through_the_child_match_the_device_keys(share):
    """The counters a sandboxed device reports have the in-process device's keys (plus the
    back-end's and the front-end's), so --metrics, ctl stats and the test plugin read the same."""
    from devices.virtio.fs.device import FsDevice

    memory = guest_ram(64 << 20, shared=True)
    local = FsDevice(FsOptions(source=str(share), tag="u", sandbox="none"))
    dev = SandboxedFsDevice(FsOptions(source=str(share), tag="t"), memory)
    try:
        m = dev.metrics()
        assert set(local.metrics()) <= set(m)
        assert {"vhost_user", "host_cpu", "vhost_user_frontend", "sandbox"} <= set(m)
        json.dumps(m)
        dev.reset_metrics()
    finally:
        dev.close()
        local.close()
        memory.close()
    assert dev.child.proc.returncode == 0


def test_standalone_back_end_jails_itself_after_its_one_front_end(share, tmp_path):
    """`device fs --socket` with the default sandbox: listens, takes one front-end, jails itself,
    serves it, and on its hang-up exits 0 with the metrics file written (opened before the jail)."""
    sock_path, metrics = tmp_path / "fs.sock", tmp_path / "m.json"
    proc = subprocess.Popen([sys.executable, "-m", "vmm", "device", "fs", "--socket", str(sock_path),
                             "--shared-dir", f"{share}:t", "--metrics", str(metrics)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not sock_path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        fe = Frontend(s)
        assert fe.u64(Request.GET_QUEUE_NUM) == 2          # answered from inside the jail
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(kids) == 1
        st = status(int(kids[0]))
        assert st["Seccomp"] == "2" and int(st["CapEff"], 16) == FS_CAPS
        assert sorted(os.listdir(f"/proc/{kids[0]}/root")) == ["hello.txt", "sub"]
        assert not sock_path.exists()                      # removed before the jail
        fe.close()
        assert proc.wait(WAIT_S) == 0, proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    m = json.loads(metrics.read_text())["devices"]["fs:t"]
    assert m["vhost_user"]["connections"] == 1 and m["vhost_user"]["messages"] == 1
