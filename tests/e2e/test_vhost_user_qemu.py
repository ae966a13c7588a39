"""Our vhost-user-fs back-end under QEMU 7.2: a front-end and a guest driver nobody here wrote.

Each test runs `python -m vmm device fs` as a child process and boots the project kernel and agent
in QEMU's microvm with `-device vhost-user-fs-device` on the back-end's socket (vmm/qemu.py has the
command line). The guest's file operations go QEMU-less from the guest's virtqueue through the
kick eventfd to our back-end and back through the call eventfd; QEMU only set the rings up. The
host then checks the real files, and counts requests with the back-end's own counters (its
control socket).
"""

from __future__ import annotations

import shutil
import signal
import time
import zlib

import pytest

from guest.script import pattern
from vmm.qemu import QEMU, BackendProcess, QemuGuest

BOOT_TIMEOUT = 600  # bounds a hung guest; not a timing assertion


@pytest.fixture(scope="module", autouse=True)
def qemu_installed():
    assert shutil.which(QEMU), (f"{QEMU} is not installed: `apt-get install qemu-system-x86 "
                                "qemu-system-common` (.ci/setup.sh does it)")


def crc(data: bytes) -> str:
    return f"0x{zlib.crc32(data):08x}"


def run_guest(kernel, script: str, backends, workdir, **kw) -> QemuGuest:
    """Boot, wait for the agent's exit line, then stop QEMU cleanly (microvm has no reset line)."""
    with QemuGuest(kernel, script, backends, workdir, **kw) as q:
        status = q.wait_exit_line(BOOT_TIMEOUT)
        assert status == 0, q.output[-3000:]
        assert not q.parser.failed and not q.parser.faults, (q.parser.failed, q.parser.faults)
    return q


def test_file_round_trips(kernel, tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    (root / "host.txt").write_bytes(b"written by the host\n" * 100)
    m = "/mnt/share"
    script = "\n".join([
        f"write {m}/small 1000 1", f"write {m}/big 1048576 2", f"read {m}/small", f"read {m}/big",
        f"read {m}/host.txt", f"append {m}/small 500 3", f"read {m}/small",
        f"mkdir {m}/dir", f"create {m}/dir/a", f"rename {m}/dir/a {m}/dir/b", f"readdir {m}/dir",
        f"symlink target {m}/link", f"readlink {m}/link", f"unlink {m}/link",
        f"stat {m}/missing x5 expect=ENOENT", f"truncate {m}/big 4096", f"stat {m}/big", "exit 0"]) + "\n"
    with BackendProcess(f"{root}:share", tmp_path) as be:
        q = run_guest(kernel, script, [be], tmp_path)
        steps = {s.step: s for s in q.parser.steps}
        # step 1 is the mount; the guest read back what it wrote, and the host agrees
        assert steps[4].extra["crc32"] == crc(pattern(1000, 1))
        assert steps[5].extra["crc32"] == crc(pattern(1048576, 2))
        assert steps[6].extra["crc32"] == crc(b"written by the host\n" * 100)
        assert steps[8].extra["crc32"] == crc(pattern(1000, 1) + pattern(500, 3))
        assert (root / "small").read_bytes() == pattern(1000, 1) + pattern(500, 3)
        assert (root / "big").read_bytes() == pattern(1048576, 2)[:4096]
        assert steps[12].extra["entries"] == "1" and (root / "dir" / "b").exists()
        assert steps[14].extra["target"] == "target" and not (root / "link").exists()
        assert steps[18].extra["size"] == "4096"
        stats = be.stats()
        for op in ("INIT", "LOOKUP", "CREATE", "WRITE", "READ", "MKDIR", "RENAME", "READDIRPLUS",
                   "SYMLINK", "READLINK", "UNLINK", "SETATTR"):
            assert stats["ops"].get(op, 0) >= 1, (op, stats["ops"])
        assert stats["bytes_written"] >= 1048576 + 1500 and stats["bytes_read"] >= 1048576
        vu = stats["vhost_user"]
        assert vu["connections"] == 1 and vu["activations"] == 1 and vu["refused"] == 0
        assert stats["virtio"]["invalid_chains"] == 0 and stats["virtio"]["handler_errors"] == 0
        assert vu["call_signals"] >= 1
        # QEMU stopped cleanly: it stopped the rings (GET_VRING_BASE) and hung up
        deadline = time.monotonic() + 30
        while be.stats()["vhost_user"]["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert be.alive()
        print(f"QEMU + vhost-user back-end: agent first line {q.timings['to_agent_s']:.2f} s, "
              f"exit line {q.timings['to_exit_line_s']:.2f} s")
        assert be.stop() == 0


def test_negative_timeout_probe_counted_by_the_backend(kernel, tmp_path):
    """The probe workload (50 missing names x 20 stats) on two shares served by two back-ends:
    1000 LOOKUPs reach the back-end with negative_timeout 0, 50 with 60."""
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    plain.mkdir()
    cached.mkdir()
    script = "probe /mnt/plain 50 20 expect=ENOENT\nprobe /mnt/cached 50 20 expect=ENOENT\nexit 0\n"
    with BackendProcess(f"{plain}:plain:negative_timeout=0", tmp_path) as bp, \
            BackendProcess(f"{cached}:cached:negative_timeout=60", tmp_path) as bc:
        q = run_guest(kernel, script, [bp, bc], tmp_path)
        p_plain, p_cached = q.parser.by_op("probe")
        assert p_plain.extra["count"] == p_cached.extra["count"] == "1000"
        assert p_plain.extra["ok"] == p_cached.extra["ok"] == "0"
        s_plain, s_cached = bp.stats(), bc.stats()
        names = [f"p{i}" for i in range(50)]
        assert {n: s_plain["lookups_by_name"].get(n) for n in names} == {n: 20 for n in names}
        assert {n: s_cached["lookups_by_name"].get(n) for n in names} == {n: 1 for n in names}
        assert sum(s_plain["lookups_by_name"].values()) == s_plain["ops"]["LOOKUP"] == 1000
        assert sum(s_cached["lookups_by_name"].values()) == s_cached["ops"]["LOOKUP"] == 50
        assert s_plain["lookup_enoent"] == 1000 and s_cached["lookup_negative"] == 50
        # Host CPU of the FUSE server per request: the marginal cost of the 950 extra LOOKUPs the
        # plain share served (both back-ends did the same mount, INIT and shutdown otherwise).
        cpu_plain, cpu_cached = bp.cpu_seconds(), bc.cpu_seconds()
        w_plain, w_cached = s_plain["host_cpu"]["worker_threads_s"], s_cached["host_cpu"]["worker_threads_s"]
        extra = s_plain["requests"] - s_cached["requests"]
        print(f"QEMU + our back-end, probe 50x20: {s_plain['ops']['LOOKUP']} LOOKUPs (negative_timeout 0) vs "
              f"{s_cached['ops']['LOOKUP']} (60); {int(p_plain.extra['ns_per_op']) / 1e3:.1f} vs "
              f"{int(p_cached.extra['ns_per_op']) / 1e3:.1f} us per stat in the guest; back-end CPU per "
              f"extra request: process {(cpu_plain - cpu_cached) / extra * 1e6:.0f} us, worker thread "
              f"{(w_plain - w_cached) / extra * 1e6:.0f} us ({extra} requests, process totals "
              f"{cpu_plain:.2f} / {cpu_cached:.2f} s)")
        assert bp.stop() == 0 and bc.stop() == 0


def test_killed_frontend_leaves_the_backend_ready(kernel, tmp_path):
    """SIGKILL QEMU while the device runs; the back-end serves the next QEMU as if nothing happened."""
    root = tmp_path / "share"
    root.mkdir()
    with BackendProcess(f"{root}:share", tmp_path) as be:
        first = QemuGuest(kernel, "write /mnt/share/first 4096 1\nmark running\nsleep 600000\nexit 0\n",
                          [be], tmp_path)
        with first:
            deadline = time.monotonic() + BOOT_TIMEOUT
            while first.parser.mark("running") is None:
                assert first.proc.poll() is None, first.output[-3000:]
                assert time.monotonic() < deadline, first.output[-3000:]
                time.sleep(0.2)
            assert be.stats()["vhost_user"]["active"]
            first.stop(signal.SIGKILL)  # no GET_VRING_BASE, no goodbye: the socket just closes
        deadline = time.monotonic() + 30
        while be.stats()["vhost_user"]["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert be.alive(), be.log_tail()
        assert (root / "first").read_bytes() == pattern(4096, 1)

        q = run_guest(kernel, "read /mnt/share/first\nwrite /mnt/share/second 8192 2\nexit 0\n", [be], tmp_path)
        assert q.parser.by_op("read")[0].extra["crc32"] == crc(pattern(4096, 1))
        assert (root / "second").read_bytes() == pattern(8192, 2)
        vu = be.stats()["vhost_user"]
        assert vu["connections"] == 2 and vu["activations"] == 2 and vu["closed_by_backend"] == 0
        assert be.stop() == 0
