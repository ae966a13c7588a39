"""`python -m vmm fuse-mount`: the FUSE server on the host's /dev/fuse, driven by real syscalls.

Each test starts the real command as a subprocess on a fresh share, works through the mount with
ordinary file calls, and checks the result on the host directory behind it, the exit status, the
unmount and the device counters the command writes with --metrics.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from devices.fusedev.mount import MNT_DETACH, sys_umount2
from tests.pjdfstest_support import FuseMountProcess, mount_fstype, start_fuse_mount

REPO = Path(__file__).resolve().parent.parent

if not os.path.exists("/dev/fuse"):
    pytest.skip("!!! /dev/fuse is absent: host FUSE mount tests NOT RUN (modprobe fuse)",
                allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("!!! not root: the fuse-mount tests mount with mount(2) and switch uids",
                allow_module_level=True)


@pytest.fixture
def mounts(tmp_path):
    """Start fuse-mount processes; whatever a test leaves mounted is stopped and detached."""
    started: list[FuseMountProcess] = []

    def start(*options: str, name: str = "m", extra_args=()) -> FuseMountProcess:
        fm = start_fuse_mount(tmp_path / name, options, extra_args=extra_args)
        started.append(fm)
        return fm

    yield start
    for fm in started:
        if fm.proc.poll() is None:
            fm.proc.kill()
            fm.proc.wait()
        if mount_fstype(fm.mountpoint) == "fuse.pyvmm":
            sys_umount2(str(fm.mountpoint), MNT_DETACH)


def _metrics(fm: FuseMountProcess) -> dict:
    data = json.loads(fm.metrics_path.read_text())
    return data["devices"]["fs:fuse-mount"]


def _same_stat(a: os.stat_result, b: os.stat_result) -> None:
    for field in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                  "st_mtime_ns"):
        assert getattr(a, field) == getattr(b, field), field


def test_file_workload_through_the_mount_matches_the_host_directory(mounts, tmp_path):
    trace = tmp_path / "trace.jsonl"
    fm = mounts("cache=never", extra_args=("--trace", str(trace)))
    mnt, src = fm.mountpoint, fm.source
    data = os.urandom(300_000)                       # several max_pages-sized WRITEs and READs

    (mnt / "a.bin").write_bytes(data)
    assert (src / "a.bin").read_bytes() == data      # it reached the host file
    assert (mnt / "a.bin").read_bytes() == data      # and reads back through the mount
    _same_stat(os.stat(mnt / "a.bin"), os.stat(src / "a.bin"))

    os.mkdir(mnt / "d", 0o750)
    os.rename(mnt / "a.bin", mnt / "d" / "b.bin")
    assert not (src / "a.bin").exists() and (src / "d" / "b.bin").read_bytes() == data
    os.symlink("b.bin", mnt / "d" / "link")
    assert os.readlink(mnt / "d" / "link") == "b.bin"
    os.link(mnt / "d" / "b.bin", mnt / "d" / "hard")
    assert os.stat(mnt / "d" / "hard").st_nlink == 2
    os.truncate(mnt / "d" / "b.bin", 10)
    os.chmod(mnt / "d" / "b.bin", 0o600)
    os.utime(mnt / "d" / "b.bin", ns=(1_000_000_123, 2_000_000_456))
    _same_stat(os.stat(mnt / "d" / "b.bin"), os.stat(src / "d" / "b.bin"))
    assert os.stat(src / "d" / "b.bin").st_mtime_ns == 2_000_000_456
    assert sorted(os.listdir(mnt / "d")) == sorted(os.listdir(src / "d")) == \
        ["b.bin", "hard", "link"]
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")

    for name in ("b.bin", "hard", "link"):
        os.unlink(mnt / "d" / name)
    os.rmdir(mnt / "d")
    assert os.listdir(src) == [] and os.listdir(mnt) == []

    assert fm.stop(signal.SIGTERM) == 0
    assert mount_fstype(mnt) is None
    m = _metrics(fm)
    for op in ("INIT", "LOOKUP", "CREATE", "WRITE", "READ", "MKDIR", "RENAME", "SYMLINK",
               "READLINK", "LINK", "SETATTR", "READDIRPLUS", "UNLINK", "RMDIR"):
        assert m["ops"].get(op, 0) > 0, op
    assert m["bytes_written"] >= len(data) and m["bytes_read"] >= len(data)
    dev = m["fusedev"]
    assert dev["errors"] == 0 and dev["replies"] > 0
    assert dev["requests"] == dev["replies"] + dev["no_reply"] + dev["replies_unwanted"]
    ops = {json.loads(line)["op"] for line in trace.read_text().splitlines()}
    assert {"INIT", "CREATE", "WRITE", "RENAME"} <= ops


def test_sigint_unmounts_cleanly(mounts):
    fm = mounts()
    (fm.mountpoint / "f").write_text("x")
    assert fm.stop(signal.SIGINT) == 0
    assert mount_fstype(fm.mountpoint) is None
    assert "SIGINT: unmounted" in fm.log()
    assert (fm.source / "f").read_text() == "x"
    assert os.listdir(fm.mountpoint) == []           # the bare mount point again


def test_unmount_from_outside_ends_the_process(mounts):
    fm = mounts()
    os.listdir(fm.mountpoint)
    sys_umount2(str(fm.mountpoint), 0)
    assert fm.proc.wait(15) == 0
    assert "was unmounted" in fm.log()


def test_sigterm_with_the_mount_in_use_detaches_then_aborts(mounts):
    """A process inside the mount cannot keep the server alive forever: the mount leaves the
    namespace at once, and after the grace period the connection is aborted."""
    fm = mounts("cache=never")
    (fm.mountpoint / "held").write_bytes(b"data")
    fd = os.open(fm.mountpoint / "held", os.O_RDONLY)
    try:
        fm.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while mount_fstype(fm.mountpoint) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mount_fstype(fm.mountpoint) is None, "lazy unmount did not detach the mount"
        assert fm.proc.wait(30) == 1                 # not clean: a user was cut off
        with pytest.raises(OSError) as e:
            os.pread(fd, 4, 0)
        assert e.value.errno == errno.ENOTCONN
    finally:
        try:
            os.close(fd)                             # its FLUSH cannot be answered either
        except OSError as e:
            assert e.errno == errno.ENOTCONN
    assert "still in use" in fm.log()


@pytest.mark.parametrize("negative_timeout, lookups", [(0, 10), (60, 1)])
def test_negative_timeout_is_counted_by_the_device(mounts, negative_timeout, lookups):
    fm = mounts(f"negative_timeout={negative_timeout}", name=f"neg{negative_timeout}")
    for _ in range(10):
        assert not os.path.exists(fm.mountpoint / "missing")
    assert fm.stop() == 0
    m = _metrics(fm)
    assert m["lookups_by_name"]["missing"] == lookups
    if negative_timeout:
        assert m["lookup_negative"] == 1 and m["lookup_enoent"] == 0
    else:
        assert m["lookup_negative"] == 0 and m["lookup_enoent"] == lookups


def test_requests_are_served_by_several_threads(mounts):
    fm = mounts("num_request_queues=3")
    assert "3 thread(s)" in fm.log()
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: (fm.mountpoint / f"f{i}").write_bytes(bytes([i]) * 70_000),
                      range(24)))
    assert sorted(os.listdir(fm.source)) == sorted(f"f{i}" for i in range(24))
    assert all((fm.source / f"f{i}").read_bytes() == bytes([i]) * 70_000 for i in range(24))
    assert fm.stop() == 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm", "fuse-mount", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_bad_arguments_are_one_line_errors(tmp_path):
    (tmp_path / "mnt").mkdir()
    r = _cli(str(tmp_path / "nope"), str(tmp_path / "mnt"))
    assert r.returncode == 2 and "source" in r.stderr and "Traceback" not in r.stderr
    r = _cli(str(tmp_path), str(tmp_path / "mnt"))           # mount point inside the share
    assert r.returncode == 2 and "must not contain each other" in r.stderr
    r = _cli(str(tmp_path / "mnt"), str(tmp_path / "absent"))
    assert r.returncode == 2 and "mount point" in r.stderr
    r = _cli(str(tmp_path / "mnt"), str(tmp_path), "-o", "colour=blue")
    assert r.returncode == 2 and "unknown option" in r.stderr
    assert mount_fstype(tmp_path) is None and mount_fstype(tmp_path / "mnt") is None


class _FaultyServer:
    """A real Server that, for one opcode each, writes nothing, raises, or writes a reply whose
    header lies about its length: what the transport must survive without leaving the caller
    waiting forever."""

    def __init__(self, server, silent: int, raising: int, malformed: int) -> None:
        self.server, self.silent, self.raising, self.malformed = server, silent, raising, malformed
        self.max_request, self.max_write = server.max_request, server.max_write

    def handle(self, reader, writer, queue=0, **kw):
        opcode = int.from_bytes(reader.buf[4:8], "little")
        if opcode == self.silent:
            return 0
        if opcode == self.raising:
            raise RuntimeError("injected")
        n = self.server.handle(reader, writer, queue, **kw)
        if opcode == self.malformed:
            writer.write_at(0, (n + 8).to_bytes(4, "little"))   # the kernel answers EINVAL
        return n


def test_a_request_the_server_cannot_answer_gets_eio_not_a_hang(tmp_path):
    """In-process: the transport's own threads serve this process's syscalls."""
    from devices.fusedev.mount import mount_fuse
    from devices.fusedev.session import FuseSession
    from devices.virtio.fs.device import make_server
    from devices.virtio.fs.options import FsOptions
    from devices.virtio.fs.passthrough import PassthroughFs
    from fuse import abi
    from fuse.metrics import Metrics

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    server = make_server(PassthroughFs(FsOptions(source=str(src), tag="t")), Metrics(), None)
    m = mount_fuse(str(mnt), str(src))
    session = FuseSession(m.fd, _FaultyServer(server, abi.Opcode.MKDIR, abi.Opcode.SYMLINK,
                                              abi.Opcode.MKNOD), threads=2)
    session.start()

    def errno_of(call) -> int | str:
        """Run ``call`` in a thread; if it hangs, abort the connection (close /dev/fuse) so
        the test fails instead of hanging in an unkillable wait."""
        out: list = []

        def run():
            try:
                call()
                out.append("no error")
            except OSError as e:
                out.append(e.errno)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(10)
        if t.is_alive():
            session.stop()
            m.close()
            t.join(10)
            return "hung"
        return out[0]

    try:
        (mnt / "ok").write_text("fine")
        assert errno_of(lambda: os.mkdir(mnt / "d")) == errno.EIO
        assert errno_of(lambda: os.symlink("t", mnt / "l")) == errno.EIO
        assert errno_of(lambda: os.mkfifo(mnt / "p")) == errno.EIO
        assert (mnt / "ok").read_text() == "fine"          # still serving
        assert session.counters.errors == 3
    finally:
        m.unmount()
        session.wait_disconnected(10)
        session.stop()
        m.close()
    assert mount_fstype(mnt) is None


@pytest.mark.parametrize("permissive", [False, True], ids=["defaults", "options"])
def test_the_host_safety_policies_are_what_a_mount_shows(mounts, permissive):
    """What a guest would see of the policies, seen without a VM: set-id bits, device nodes,
    host-enforced xattrs (issue 11), through the host kernel's own FUSE client."""
    opts = ("allow_setid=true", "allow_mknod=true", "xattr_policy=passthrough") \
        if permissive else ()
    fm = mounts("cache=never", *opts)
    mnt, src = fm.mountpoint, fm.source
    (mnt / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(mnt / "tool", 0o4755)
    os.setxattr(mnt / "tool", "trusted.overlay.opaque", b"y")
    assert os.getxattr(mnt / "tool", "trusted.overlay.opaque") == b"y"
    mode = os.stat(src / "tool").st_mode & 0o7777
    if permissive:
        assert mode == 0o4755 == os.stat(mnt / "tool").st_mode & 0o7777
        os.mknod(mnt / "null", 0o600 | 0o020000, os.makedev(1, 3))
        assert os.stat(src / "null").st_rdev == os.makedev(1, 3)
        assert os.getxattr(src / "tool", "trusted.overlay.opaque") == b"y"
    else:
        assert mode == 0o755 == os.stat(mnt / "tool").st_mode & 0o7777   # told the truth
        with pytest.raises(PermissionError):
            os.mknod(mnt / "null", 0o600 | 0o020000, os.makedev(1, 3))
        assert not (src / "null").exists()
        assert os.listxattr(src / "tool") == ["user.virtiofs.trusted.overlay.opaque"]
    assert fm.stop() == 0
