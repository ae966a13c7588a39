"""Every user-facing path of ``python -m vmm`` that the other end-to-end tests do not take.

One real ``run`` process takes most of the options at once (each check below names what it proves),
the control socket is driven with ``python -m vmm ctl`` while that guest runs, and the two exit
statuses no other test reaches (124 guest timeout, 113 vCPU error) are provoked for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guest.initramfs import build_initramfs
from tests.e2e.helpers import share

REPO = Path(__file__).resolve().parents[2]


def vmm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm", *args], cwd=REPO, capture_output=True,
                          text=True, **kw)


def test_run_options_config_keys_and_ctl_against_a_real_vm(kernel, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_bytes(b"hello over virtio-fs\n")
    initrd = tmp_path / "user.cpio"   # kernel.initrd: unpacked into the guest's rootfs
    initrd.write_bytes(build_initramfs({"from-initrd.txt": b"user initramfs file\n"}))
    serial_log = tmp_path / "serial.log"
    config = tmp_path / "vm.yaml"
    config.write_text(f"kernel: {{path: {kernel}, initrd: {initrd}}}\n"
                      f"serial: {{log: {serial_log}, stdin: false}}\n")
    script = tmp_path / "script.txt"
    script.write_text("cpus\nmeminfo\nread /from-initrd.txt\nread /mnt/data/hello.txt\n"
                      "stat /mnt/data/missing x4 expect=ENOENT\nmark wait-for-ctl\nsleep 60000\n"
                      "exit 9\n")
    metrics, sock = tmp_path / "m.json", tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmm", "run", str(config), "--script", str(script),
         "--vcpus", "2", "--cmdline", "maxcpus=1", "--memory", "96", "--discovery", "both",
         "--shared-dir", f"{data}:data:negative_timeout=60:trace=true",
         "--metrics", str(metrics), "--control", str(sock)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "name=wait-for-ctl" in line:
                break
        else:
            pytest.fail(f"the guest never reached the mark: {proc.stderr.read()[-3000:]}")
        stats = vmm("ctl", str(sock), "stats", timeout=60)
        assert stats.returncode == 0, stats.stderr
        fs = json.loads(stats.stdout)["devices"]["fs:data"]
        assert fs["lookups_by_name"]["missing"] == 1          # --shared-dir options applied
        assert json.loads(vmm("ctl", str(sock), "reset", timeout=60).stdout) == {"ok": True}
        after = json.loads(vmm("ctl", str(sock), "stats", timeout=60).stdout)
        assert after["devices"]["fs:data"]["lookups_by_name"] == {}
        assert vmm("ctl", str(sock), "stop", timeout=60).returncode == 0
        rest, err = proc.communicate(timeout=120)
        out = "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 112, err[-3000:]               # stopped: no agent status
    assert "stopped through the control socket" in err
    steps = {s["op"]: s for s in (dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                                  for line in out.splitlines() if "@@pyvmm step=" in line)}
    assert steps["cpus"]["cpus"] == "1"                       # --cmdline reached the guest
    assert 80 * 1024 < int(steps["meminfo"]["total_kb"]) <= 96 * 1024   # --memory 96
    assert steps["read"]["size"] == str(len(b"hello over virtio-fs\n"))
    m = json.loads(metrics.read_text())                       # --metrics, written on exit
    assert m["exit_status"] == 112 and m["stop"] == "CONTROL"
    assert m["devices"]["fs:data"]["lookups_by_name"] == {}  # the ctl reset stuck
    log_text = serial_log.read_text(errors="replace")         # serial.log: the whole console
    assert "name=wait-for-ctl" in log_text and "op=cpus" in log_text
    initrd_read = [line for line in out.splitlines() if "op=read" in line][0]
    assert "result=ok" in initrd_read and f"size={len(b'user initramfs file')+1}" in initrd_read
    trace = Path(f"/tmp/pyvmm-virtio-fs-data-{proc.pid}.trace.jsonl")   # default trace path
    try:
        records = [json.loads(line) for line in trace.read_text().splitlines()]
        assert any(r["op"] == "LOOKUP" and r["name"] == "missing" for r in records)
    finally:
        trace.unlink(missing_ok=True)
    assert not sock.exists()


def test_guest_build_prints_the_cached_kernel(kernel):
    r = vmm("guest", "build", timeout=600)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == Path(kernel).resolve()


def test_guest_timeout_is_status_124(kernel, tmp_path):
    config = tmp_path / "vm.yaml"
    config.write_text(f"kernel: {{path: {kernel}}}\nguest: {{timeout: 20}}\n")
    started = time.monotonic()
    r = vmm("run", str(config), "--exec", "sleep 600000", timeout=300)
    assert r.returncode == 124, r.stderr[-2000:]
    assert "timed out" in r.stderr
    assert time.monotonic() - started < 200


def test_vcpu_error_is_status_113(guest, tmp_path, monkeypatch):
    """A vCPU thread that fails (here KVM_RUN raises during the boot, after 200 exits; a whole
    run has about 700) ends the run with 113 and says which vCPU and why."""
    from kvm_sys import kvm

    real_run = kvm.Vcpu.run
    calls = {"n": 0}

    def failing_run(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 200:
            raise OSError(5, "injected KVM_RUN failure")
        return real_run(self, *a, **k)

    monkeypatch.setattr(kvm.Vcpu, "run", failing_run)
    r = guest.run("sleep 600000", shares=[share(tmp_path)], timeout=300)
    assert r.exit_status == 113, r.message
    assert "injected KVM_RUN failure" in r.message + r.output


def test_cache_auto_is_close_to_open_and_forget_uses_hiprio(boot, tmp_path):
    """cache=auto: a file changed on the host is seen at the next open (close-to-open), while
    cache=always keeps serving its page cache. With timeout=0 the guest drops every dentry at
    once, so its inodes are evicted and FORGETs arrive on the hiprio queue (queue 0)."""
    auto, always = tmp_path / "auto", tmp_path / "always"
    for d in (auto, always):
        d.mkdir()
        (d / "f").write_bytes(b"version one\n")
    (auto / "g").write_bytes(b"")  # only stat'ed: no open file keeps its inode alive

    def on_line(line: bytes) -> None:
        if b"name=change" in line:
            for d in (auto, always):
                (d / "f").write_bytes(b"version TWO\n")  # same size: only the data differs
                os.utime(d / "f", ns=(0, 0))               # and no mtime hint either

    trace = tmp_path / "auto.trace.jsonl"
    r = boot("read /mnt/auto/f\nread /mnt/always/f\nmark change\nread /mnt/auto/f\n"
             "read /mnt/always/f\nstat /mnt/auto/g x3\nexit 0\n",
             shares=(share(auto, "auto", cache="auto", timeout=0, trace=True,
                           trace_path=str(trace)),
                     share(always, "always", cache="always", timeout=60)), on_line=on_line)
    assert r.exit_status == 0, r.output[-2000:]
    crcs = [s.extra["crc32"] for s in r.steps_of("read")]
    assert crcs[0] == crcs[1]                      # both read version one first
    assert crcs[2] != crcs[0]                      # auto: the new data at the next open
    assert crcs[3] == crcs[1]                      # always: the cached pages
    fs = r.device("auto")
    assert fs.count("FORGET") >= 1, fs.ops         # timeout=0: inodes evicted, FORGETs sent
    queues = {(rec["op"], rec["queue"]) for rec in map(json.loads, trace.read_text().splitlines())}
    assert ("FORGET", 0) in queues and ("READ", 1) in queues    # hiprio vs request queue
    assert not any(op == "FORGET" and q != 0 for op, q in queues)
