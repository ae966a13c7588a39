"""devices.jail for real: fork a child, jail it on a temporary share, and have it report back.

Every check runs twice where that makes sense, jailed and in an unconfined child started the same
way (``JailSpec.unconfined()``), and the two answers must differ: the control proves the check
can fail. These tests need root (they mount, pivot_root and load seccomp filters), as the suite
runs here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import mmap
import os
import resource
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devices.jail import JailError, JailSpec, spawn_jailed
from devices.jail import capabilities, namespaces, policy
from devices.virtio.fs import inodes
from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse.filesystem import Context
from tests import jail_workload as workload

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root (mounts, seccomp)")

WAIT_S = 60   # a bound on waiting for a child, not a timing assertion
FS_CAPS = capabilities.mask_of(capabilities.FS_DEVICE_CAPS)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def run(spec: JailSpec, fn: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """spawn_jailed(fn) with a result pipe; returns (exit code, fn's JSON result or None)."""
    r, w = os.pipe()
    spec = dataclasses.replace(spec, keep_fds=spec.keep_fds + (w,))

    def target(jail):
        result = fn(jail, *args)
        data = json.dumps(result).encode()
        while data:
            data = data[os.write(w, data):]
        return 0

    try:
        child = spawn_jailed(target, spec)
    finally:
        os.close(w)
    try:
        chunks = []
        deadline = time.monotonic() + WAIT_S
        while True:
            assert select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0], \
                "no answer from the child"
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        code = child.wait(WAIT_S)
        assert code is not None, "child did not exit"
    finally:
        os.close(r)
        child.close()
    data = b"".join(chunks)
    return code, (json.loads(data) if data else None)


def err_of(fn: Callable[[], Any]) -> int:
    """0 if fn() succeeds, else its OSError's errno (inside the child)."""
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno


def proc(jail, rel: str) -> str:
    """A path into this process's procfs: the kept private one in a jail, /proc otherwise."""
    return f"{jail.proc_root}{rel}"


def status(jail) -> dict[str, str]:
    with open(proc(jail, "self/status")) as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


UNCONFINED = JailSpec.unconfined()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """A share with a few files, beside a host file that must stay out of reach."""
    d = tmp_path / "share"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(b"\0" * 10)
    (tmp_path / "secret").write_text("host only")
    return d


def jailed(share: Path, **kw: Any) -> JailSpec:
    return JailSpec(root=str(share), **kw)


# ------------------------------------------------------------------------------ process state


def _state(jail) -> dict[str, Any]:
    st = status(jail)
    return {
        "CapEff": int(st["CapEff"], 16), "CapPrm": int(st["CapPrm"], 16),
        "CapBnd": int(st["CapBnd"], 16), "CapInh": int(st["CapInh"], 16),
        "CapAmb": int(st["CapAmb"], 16), "NoNewPrivs": int(st["NoNewPrivs"]),
        "Seccomp": int(st["Seccomp"]), "pid": os.getpid(),
    }


def test_status_shows_reduced_caps_no_new_privs_and_seccomp(share):
    code, s = run(jailed(share), _state)
    assert code == 0
    assert s["CapEff"] == s["CapPrm"] == s["CapBnd"] == FS_CAPS
    assert capabilities.names_of(s["CapEff"]) == ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID",
                                                  "SETGID", "SETUID"]
    assert s["CapInh"] == s["CapAmb"] == 0
    assert s["NoNewPrivs"] == 1 and s["Seccomp"] == 2
    assert s["pid"] == 1                               # PID 1 of its own PID namespace
    # control: the same report from an unconfined child
    code, c = run(UNCONFINED, _state)
    assert code == 0
    assert c["CapEff"] & ~FS_CAPS and c["CapBnd"] & ~FS_CAPS
    assert c["NoNewPrivs"] == 0 and c["Seccomp"] == 0 and c["pid"] != 1


def test_mknod_and_setfcap_only_when_allowed(share):
    code, s = run(jailed(share, allow_mknod=True, allow_setfcap=True), _state)
    assert code == 0
    assert s["CapEff"] == s["CapBnd"] == FS_CAPS | capabilities.mask_of(["MKNOD", "SETFCAP"])
    code, s = run(jailed(share), _state)
    assert not s["CapEff"] & capabilities.mask_of(["MKNOD", "SETFCAP", "SYS_ADMIN",
                                                   "DAC_READ_SEARCH", "SYS_CHROOT"])


def _namespaces(jail) -> dict[str, int]:
    return {ns: os.stat(proc(jail, f"self/ns/{ns}")).st_ino
            for ns in ("mnt", "pid", "ipc", "uts", "net")}


def _net_devices(jail) -> list[str]:
    with open(proc(jail, "self/net/dev")) as f:
        return sorted(line.split(":")[0].strip() for line in f.read().splitlines()[2:])


def test_new_namespaces_and_only_loopback(share):
    host = {ns: os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("mnt", "pid", "ipc", "uts", "net")}
    code, ns = run(jailed(share), _namespaces)
    assert code == 0
    assert all(ns[k] != host[k] for k in host), (ns, host)
    code, ns = run(UNCONFINED, _namespaces)
    assert ns == host                                   # control
    code, devs = run(jailed(share), _net_devices)
    assert code == 0 and devs == ["lo"]
    code, devs = run(UNCONFINED, _net_devices)
    assert devs != ["lo"] and "lo" in devs              # control: the host has more


def _hostname(jail) -> str:
    return os.uname().nodename


def test_new_uts_namespace_has_its_own_hostname(share):
    code, name = run(jailed(share, seccomp_action=None), _hostname)   # uname is not allowlisted
    assert code == 0 and name == "pyvmm-jail" != os.uname().nodename
    code, name = run(UNCONFINED, _hostname)
    assert name == os.uname().nodename                  # control


def _limits(jail) -> dict[str, str]:
    with open(proc(jail, "self/limits")) as f:
        rows = f.read().splitlines()[1:]
    return {r[:26].strip(): r[26:47].strip() for r in rows}


def test_rlimits_nofile_and_no_core_dumps(share):
    code, lim = run(jailed(share, max_open_files=64), _limits)
    assert code == 0
    assert lim["Max open files"] == "64" and lim["Max core file size"] == "0"
    code, lim = run(UNCONFINED, _limits)
    assert lim["Max open files"] == str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


# ------------------------------------------------------------------------------ the root


def _root_view(jail, host_secret: str, host_share: str) -> dict[str, Any]:
    root, dotdot = os.stat("/"), os.stat("/..")
    return {
        "listing": sorted(os.listdir("/")),
        "sub": sorted(os.listdir("/sub")),
        "a": open("/a.txt").read(),
        "root_ino": root.st_ino, "dotdot_is_root": (dotdot.st_dev, dotdot.st_ino)
        == (root.st_dev, root.st_ino),
        # the host file by its host path, by the share's host path, and through procfs links
        "secret": err_of(lambda: open(host_secret).close()),
        "share_path": err_of(lambda: os.stat(host_share)),
        "self_root": err_of(lambda: open(proc(jail, "self/root") + host_secret).close()),
        "pid1_root": err_of(lambda: open(proc(jail, "1/root/../../..") + host_secret).close()),
        "proc_dotdot": err_of(lambda: os.stat(proc(jail, "../" * 8) + host_secret)),
        "etc": err_of(lambda: os.stat("/etc/passwd")),
        # the kept procfs: subset=pid (no /proc/sys) and read-only
        "proc_sys": err_of(lambda: os.stat(proc(jail, "sys/kernel"))),
        "proc_write": err_of(lambda: os.close(os.open(proc(jail, "self/comm"), os.O_WRONLY))),
    }


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_root_is_the_share_and_the_host_is_out_of_reach(share, tmp_path, mode):
    secret, host_share = str(tmp_path / "secret"), str(share)
    code, v = run(jailed(share, mode=mode), _root_view, secret, host_share)
    assert code == 0
    assert v["listing"] == ["a.txt", "sub"] and v["sub"] == ["b.bin"] and v["a"] == "hello"
    assert v["root_ino"] == share.stat().st_ino and v["dotdot_is_root"]
    for key in ("secret", "share_path", "self_root", "pid1_root", "proc_dotdot", "etc",
                "proc_sys"):
        assert v[key] == errno.ENOENT, (key, v[key])
    assert v["proc_write"] == errno.EROFS
    # control: the same questions unconfined reach the host
    code, c = run(UNCONFINED, _root_view_unconfined, secret)
    assert c["secret"] == 0 and c["etc"] == 0 and c["listing"] != v["listing"]
    assert c["proc_sys"] == 0 and c["proc_write"] == 0


def _root_view_unconfined(jail, host_secret: str) -> dict[str, Any]:
    return {"listing": sorted(os.listdir("/")),
            "secret": err_of(lambda: open(host_secret).close()),
            "etc": err_of(lambda: os.stat("/etc/passwd")),
            "proc_sys": err_of(lambda: os.stat("/proc/sys/kernel")),
            "proc_write": err_of(lambda: os.close(os.open("/proc/self/comm", os.O_WRONLY)))}


def _chroot_escape(jail, host_secret: str) -> dict[str, int]:
    """The classic chroot escape, with every capability: chroot into a subdirectory while the
    cwd stays above it, climb with "..", chroot there."""
    os.chdir("/")
    os.mkdir("/esc")
    os.chroot("/esc")
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    return {"secret": err_of(lambda: open(host_secret).close())}


def test_pivot_root_leaves_no_host_tree_to_escape_to(share, tmp_path):
    """Even a process that kept CAP_SYS_CHROOT and no filter finds no host tree after
    pivot_root; in chroot mode the same escape reaches the host (the control, and the reason
    chroot mode depends on dropping CAP_SYS_CHROOT and closing stray fds)."""
    secret = str(tmp_path / "secret")
    all_caps = dict(keep_caps=None, seccomp_action=None)
    code, r = run(jailed(share, mode="namespace", **all_caps), _chroot_escape, secret)
    assert code == 0 and r["secret"] == errno.ENOENT
    (share / "esc").rmdir()
    code, r = run(jailed(share, mode="chroot", **all_caps), _chroot_escape, secret)
    assert code == 0 and r["secret"] == 0


def _open_node(jail, path: str) -> int:
    return err_of(lambda: os.close(os.open(path, os.O_RDONLY)))


def test_device_node_in_the_share_cannot_be_opened(share):
    os.mknod(share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    code, e = run(jailed(share), _open_node, "/null")
    assert code == 0 and e == errno.EACCES              # the jail's view is nodev
    code, e = run(UNCONFINED, _open_node, str(share / "null"))
    assert e == 0                                        # control


def _fds(jail, fd: int) -> dict[str, int]:
    return {"inherited": err_of(lambda: os.fstat(fd))}


def test_fds_not_kept_are_closed_and_kept_dirs_refused(share, tmp_path):
    fd = os.open(tmp_path / "secret", os.O_RDONLY)
    try:
        code, r = run(jailed(share), _fds, fd)
        assert code == 0 and r["inherited"] == errno.EBADF
        code, r = run(UNCONFINED, _fds, fd)
        assert r["inherited"] == 0                       # control
    finally:
        os.close(fd)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(JailError, match="directory"):
            spawn_jailed(lambda jail: 0, jailed(share, keep_fds=(dfd,)))
    finally:
        os.close(dfd)


# ------------------------------------------------------------------------------ seccomp


def _forbidden(jail) -> dict[str, int]:
    def raw(nr: int, *args: Any) -> int:
        r = _libc.syscall(ctypes.c_long(nr), *[a if isinstance(a, bytes) else ctypes.c_long(a)
                                               for a in args])
        return 0 if r >= 0 else ctypes.get_errno()

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    out = {"execve": err_of(lambda: os.execv("/bin/true", ["true"]))}
    fd = os.open("/a.txt", os.O_RDONLY)               # (pipe2 is not allowed in the jail)
    out |= {
        "socket": err_of(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
        "ptrace": raw(101, 16, 0),                  # PTRACE_ATTACH pid 0: ESRCH if allowed
        "mount": raw(165, b"none", b"/no-such-mount-target", b"tmpfs", 0, 0),  # ENOENT
        "unshare": raw(272, 0),                     # unshare(0) is a no-op if allowed
        "fork": err_of(fork),
        "clone3": raw(435, 0, 0),                   # EINVAL/EFAULT if allowed
        "fionread": raw(16, fd, 0x541B, 0),         # ioctl(file, FIONREAD, NULL): EFAULT
        "setuid": raw(105, 0),
        "x32_getpid": raw(39 | 0x40000000),         # ENOSYS: no x32 ABI here
        "beyond_table": raw(1000),                  # ENOSYS either way (a newer call)
        "getpid": raw(39),                          # allowed: control inside the jail
    }
    os.close(fd)
    return out


def test_forbidden_calls_get_eperm(share):
    code, j = run(jailed(share), _forbidden)
    assert code == 0
    for name in ("execve", "socket", "ptrace", "mount", "unshare", "fork", "fionread", "setuid",
                 "x32_getpid"):
        assert j[name] == errno.EPERM, (name, errno.errorcode.get(j[name], j[name]))
    assert j["clone3"] == errno.ENOSYS and j["beyond_table"] == errno.ENOSYS
    assert j["getpid"] == 0
    # control: without the filter every one of them reaches the kernel (execve succeeds: the
    # child becomes /bin/true and never answers)
    code, c = run(dataclasses.replace(jailed(share), seccomp_action=None), _forbidden)
    assert c is not None, "the control child did not answer"
    assert c["execve"] == errno.ENOENT                  # /bin/true is not in the share
    assert c["socket"] == 0 and c["fork"] == 0 and c["fionread"] == errno.EFAULT
    assert c["ptrace"] == errno.ESRCH and c["x32_getpid"] == errno.ENOSYS
    assert c["clone3"] in (errno.EINVAL, errno.EFAULT)
    assert c["mount"] == errno.ENOENT and c["unshare"] == 0 and c["setuid"] == 0
    code, c = run(UNCONFINED, _forbidden)
    assert code == 0 and c is None                      # the unconfined child exec'd /bin/true


def _execve_in_place(jail) -> dict[str, int]:
    return {"execve": err_of(lambda: os.execv("/bin/true", ["true"]))}


def test_execve_refused_where_the_binary_exists():
    spec = JailSpec(mode="none", keep_caps=None, seccomp_action="errno")
    code, r = run(spec, _execve_in_place)
    assert code == 0 and r == {"execve": errno.EPERM}
    code, r = run(UNCONFINED, _execve_in_place)
    assert code == 0 and r is None                       # control: /bin/true ran and exited 0


def _socket_then_report(jail) -> dict[str, int]:
    return {"socket": err_of(lambda: socket.socket(socket.AF_UNIX).close())}


def test_kill_mode_kills_with_sigsys(share):
    code, r = run(jailed(share, seccomp_action="kill"), _socket_then_report)
    assert code == -signal.SIGSYS and r is None
    code, r = run(jailed(share, seccomp_action="errno"), _socket_then_report)
    assert code == 0 and r == {"socket": errno.EPERM}   # control


_I386_GETPID = bytes([0xB8, 20, 0, 0, 0,   # mov eax, 20 (__NR_getpid on i386)
                      0xCD, 0x80,          # int 0x80: an i386 system call
                      0xC3])               # ret


def _int80_getpid(jail) -> dict[str, int]:
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_I386_GETPID)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(addr)
    return {"pid": fn(), "real": os.getpid()}


def test_foreign_architecture_is_killed_even_in_errno_mode():
    spec = JailSpec(mode="none", keep_caps=None, seccomp_action="errno")
    code, r = run(spec, _int80_getpid)
    assert code == -signal.SIGSYS and r is None
    code, r = run(UNCONFINED, _int80_getpid)
    assert code == 0 and r["pid"] == r["real"]         # control: int 0x80 works unfiltered


def _threads_ok(jail) -> dict[str, int]:
    return {"threads": workload.threads(8)}


def test_threads_work_under_the_filter(share):
    code, r = run(jailed(share, seccomp_action="kill"), _threads_ok)
    assert code == 0 and r == {"threads": 8}


# ------------------------------------------------------------------------------ real work


def _serve(jail, sock_fd: int) -> dict[str, int]:
    inodes.set_proc_root(jail.proc_root)
    return workload.run_all("/", sock_fd)


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_fs_workload_runs_jailed_under_the_strict_filter(share, mode):
    """The whole device workload (every FUSE op, the worker thread, a vhost-user exchange with
    guest memory as a shared memfd) in a jail that kills on any call outside the allowlist."""
    for p in sorted(share.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keep = workload.frontend_send(front)
    memfd = keep[0]
    bfd = back.detach()
    errors: list[BaseException] = []

    def frontend() -> None:
        try:
            workload.frontend_finish(front)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=frontend)
    t.start()
    try:
        code, r = run(jailed(share, mode=mode, seccomp_action="kill", keep_fds=(bfd,)),
                      _serve, bfd)
    finally:
        os.close(bfd)
        t.join(WAIT_S)
        front.close()
    assert code == 0, f"jailed workload exited with {code}"
    assert r["requests"] > 50 and r["threads"] == 4 and r["irqs"] > 0
    assert not errors, errors
    # the backend's reply landed in the frontend's memory: the memfd really is shared
    assert os.pread(memfd, len(workload.REPLY_MAGIC), 8192) == workload.REPLY_MAGIC
    for fd in keep:
        os.close(fd)
    assert list(share.iterdir()) == []                  # the workload cleans up after itself


def _create_files(jail) -> dict[str, Any]:
    inodes.set_proc_root(jail.proc_root)
    fs = PassthroughFs(FsOptions(source="/", tag="t"))
    fs.init(0xFFFFFFFF)
    ctx = Context(uid=1000, gid=1000, pid=1)
    entry, fh, _ = fs.create(ctx, 1, b"new", 0o644, os.O_RDWR, 0)
    fs.release(ctx, entry.nodeid, fh, 0)
    fs.rename(ctx, 1, b"a.txt", 1, b"renamed.txt", 0)
    renamed = fs.lookup(ctx, 1, b"renamed.txt").nodeid
    fs.setxattr(ctx, renamed, b"user.tag", b"v", 0)
    sub = fs.lookup(ctx, 1, b"sub").nodeid
    fs.link(ctx, renamed, sub, b"hard")                 # linkat through self/fd/N
    attr, _ = fs.getattr(ctx, renamed, None)
    return {"nodeid": entry.nodeid, "nlink": attr.st_nlink,
            "xattr": fs.getxattr(ctx, renamed, b"user.tag", 64).decode()}


def test_files_created_in_the_jail_appear_on_the_host_with_the_guest_owner(share):
    code, r = run(jailed(share), _create_files)
    assert code == 0 and r["nodeid"] > 1 and r["nlink"] == 2 and r["xattr"] == "v"
    st = (share / "new").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)       # CAP_CHOWN kept
    assert (share / "renamed.txt").read_text() == "hello"
    assert os.getxattr(share / "renamed.txt", "user.tag") == b"v"
    assert (share / "sub" / "hard").stat().st_ino == (share / "renamed.txt").stat().st_ino


# ------------------------------------------------------------------------------ handles


def test_exit_status_and_pids_are_reported(share):
    child = spawn_jailed(lambda jail: 7, jailed(share))
    try:
        assert child.jailed_pid != child.pid
        assert child.wait(WAIT_S) == 7
    finally:
        child.close()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for the host's init to reap it counts as dead)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def _sleep_forever(jail) -> int:
    while True:
        time.sleep(3600)


def test_kill_takes_the_jailed_process_down_and_the_pidfd_reports_it(share):
    child = spawn_jailed(_sleep_forever, jailed(share))
    try:
        jailed_pid = child.jailed_pid
        assert Path(f"/proc/{jailed_pid}").exists()
        assert not select.select([child], [], [], 0)[0]   # running: pidfd not readable
        child.kill()
        assert select.select([child], [], [], WAIT_S)[0]  # the relay exited
        assert child.wait(WAIT_S) == -signal.SIGKILL
        deadline = time.monotonic() + WAIT_S
        while _alive(jailed_pid) and time.monotonic() < deadline:
            time.sleep(0.01)                            # parent-death signal, then init reaps
        assert not _alive(jailed_pid)
    finally:
        child.close()


def test_sigterm_to_the_relay_stops_the_jailed_process(share):
    child = spawn_jailed(_sleep_forever, jailed(share))
    try:
        os.kill(child.pid, signal.SIGTERM)   # PID 1 of a namespace would ignore it: relayed
        assert child.wait(WAIT_S) == -signal.SIGKILL
        deadline = time.monotonic() + WAIT_S
        while _alive(child.jailed_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(child.jailed_pid)
    finally:
        child.close()


def test_a_process_with_threads_is_not_jailed_half_way():
    import devices.jail as jail_pkg
    ev = threading.Event()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            threading.Thread(target=ev.wait, daemon=True).start()
            try:
                jail_pkg.enter(JailSpec(mode="none", seccomp_action=None))
                code = 0
            except JailError as e:
                os.write(w, str(e).encode())
                code = 4
        finally:
            os._exit(code)
    os.close(w)
    msg = os.read(r, 1000).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 4 and "threads" in msg
    # control: the same without the thread is jailed
    pid = os.fork()
    if pid == 0:
        try:
            jail_pkg.enter(JailSpec(mode="none", seccomp_action=None))
            os._exit(0)
        finally:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_setup_failure_is_reported_as_jail_error(share, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    bad = jailed(gone)
    gone.rmdir()                                        # vanishes between config and start
    with pytest.raises(JailError, match="setup failed.*FileNotFoundError"):
        spawn_jailed(lambda jail: 0, bad)


def test_spec_validation(share, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        JailSpec(root=str(share), mode="jail")
    with pytest.raises(ValueError, match="root"):
        JailSpec(mode="namespace")
    with pytest.raises(ValueError, match="not a directory"):
        JailSpec(root=str(tmp_path / "secret"))
    with pytest.raises(ValueError, match="seccomp_action"):
        JailSpec(root=str(share), seccomp_action="allow")
    with pytest.raises(ValueError, match="unknown capability"):
        JailSpec(root=str(share), keep_caps=frozenset({"CHOWN", "GOD_MODE"}))
    with pytest.raises(ValueError, match="no_new_privs"):
        JailSpec(root=str(share), no_new_privs=False)


def test_passthrough_proc_root_hook():
    assert inodes.proc_fd_path(5) == "/proc/self/fd/5"
    try:
        inodes.set_proc_root("")
        assert inodes.proc_fd_path(5) == "self/fd/5"
        with pytest.raises(ValueError):
            inodes.set_proc_root("proc")
    finally:
        inodes.set_proc_root("/proc/")
    assert inodes.proc_fd_path(5) == "/proc/self/fd/5"


def test_policy_never_allows_the_dangerous_calls():
    assert not set(policy.NEVER) & set(policy.FS_DEVICE)
    assert policy.FS_DEVICE["clone"] is not None and policy.FS_DEVICE["ioctl"] is not None


def _prctl_calls(jail) -> dict[str, int]:
    from devices.jail import _sys
    from devices.virtio.fs.worker import set_os_thread_name
    set_os_thread_name("pyvmm-fs-named")
    name = open("/proc/thread-self/comm", "rb").read().strip() if os.path.exists(
        "/proc/thread-self/comm") else b"?"
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.prctl(_sys.PR_SET_DUMPABLE, 1, 0, 0, 0)
    return {"named": int(name == b"pyvmm-fs-named"), "dumpable": r, "errno": ctypes.get_errno()}


def test_prctl_is_allowed_only_to_name_a_thread(share):
    """The worker names its thread (PR_SET_NAME, as crosvm allows); every other prctl, here
    PR_SET_DUMPABLE, answers EPERM under the filter."""
    code, r = run(jailed(share, seccomp_action="errno"), _prctl_calls)
    assert code == 0 and r["dumpable"] == -1 and r["errno"] == errno.EPERM, r
    assert policy.FS_DEVICE["prctl"] is not None
    code, r = run(UNCONFINED, _prctl_calls)
    assert code == 0 and r["named"] == 1 and r["dumpable"] == 0, r   # control: unfiltered


def test_namespace_flags_are_the_five_of_the_issue():
    assert namespaces.JAIL_NAMESPACES == (namespaces.CLONE_NEWNS | namespaces.CLONE_NEWPID
                                          | namespaces.CLONE_NEWIPC | namespaces.CLONE_NEWUTS
                                          | namespaces.CLONE_NEWNET)
    assert not namespaces.JAIL_NAMESPACES & namespaces.CLONE_NEWUSER


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
