"""What a jailed fs device does, as one workload: the seccomp allowlist is derived from it and the
jail tests run it under the filter (with ``seccomp_action="kill"`` one unlisted call fails them).

Three parts, each the real code a jailed backend runs:

* ``fuse_ops``: every opcode the FUSE server serves, through ``fuse.Server`` and the real
  ``PassthroughFs`` on the jail's "/" (INIT, LOOKUP, CREATE, WRITE, READ, SETATTR of every kind,
  MKDIR, MKNOD, SYMLINK, LINK, RENAME(2), READDIR(PLUS), xattrs, FALLOCATE, LSEEK,
  COPY_FILE_RANGE, FSYNC(DIR), FLUSH, STATFS, ACCESS, FORGET, RELEASE(DIR), DESTROY, ...).
* ``virtio_device``: the virtio-fs device with its worker thread (thread start/join, epoll,
  eventfds, the queue and chain code) driven by a fake driver, as tests/test_virtio_fs.py does.
* ``backend_memory``: what a vhost-user backend does with its socket: receive a memfd and
  eventfds with SCM_RIGHTS, mmap the memfd shared, wait on an eventfd with epoll, answer
  through guest memory and signal the call eventfd.

Derive or check the allowlist on a new host (needs strace)::

    .venv/bin/python tests/jail_workload.py --strace

prints the system calls the workload made after the start marker, and which of them the policy
(devices/jail/policy.py) does not allow.
"""

from __future__ import annotations

import array
import logging
import errno
import mmap
import os
import select
import socket
import stat
import struct
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# FsOptions imports these late (on validation); a jailed workload builds FsOptions after
# pivot_root, where nothing can be imported any more.
from devices.virtio.fs import idmap, secctx  # noqa: E402, F401
from devices.virtio.fs.options import FsOptions  # noqa: E402
from devices.virtio.fs.passthrough import PassthroughFs  # noqa: E402
from fuse import abi  # noqa: E402
from fuse.abi import Opcode  # noqa: E402
from fuse.io import BytesReader, BytesWriter  # noqa: E402
from fuse.server import Server  # noqa: E402
from tests.test_virtio_fs import Guest  # noqa: E402

#: Data exchanged over "guest memory" by backend_memory.
MEMFD_SIZE = 1 << 20
REQUEST_MAGIC = b"pyvmm-request\0"
REPLY_MAGIC = b"pyvmm-reply\0"

_OH = abi.OUT_HEADER.size
INIT_FLAGS = (abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES | abi.FUSE_DO_READDIRPLUS
              | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_MAX_PAGES
              | abi.FUSE_INIT_EXT | abi.FUSE_EXPORT_SUPPORT | abi.FUSE_ATOMIC_O_TRUNC)


class WorkloadError(AssertionError):
    pass


class _Client:
    """FUSE requests straight into a Server (no virtio), checking each reply."""

    def __init__(self, server: Server, uid: int = 1000, gid: int = 1000) -> None:
        self.server = server
        self.unique = 0
        self.uid, self.gid = uid, gid

    def call(self, op: int, body: bytes = b"", nodeid: int = 1, *, want: int = 0,
             out: int = 1 << 21) -> bytes:
        self.unique += 1
        hdr = abi.IN_HEADER.struct.pack(abi.IN_HEADER.size + len(body), op, self.unique, nodeid,
                                        self.uid, self.gid, 42, 0, 0)
        w = BytesWriter(out)
        n = self.server.handle(BytesReader(hdr + body), w, queue=1)
        if n == 0:
            if want:
                raise WorkloadError(f"{Opcode(op).name}: no reply, wanted -{errno.errorcode[want]}")
            return b""
        raw = w.data
        _ln, err, _u = abi.OUT_HEADER.struct.unpack_from(raw)
        if -err != want:
            got = errno.errorcode.get(-err, str(-err)) if err else "success"
            raise WorkloadError(f"{Opcode(op).name} on {nodeid}: got {got}, wanted "
                                f"{errno.errorcode[want] if want else 'success'}")
        return raw[_OH:n]

    def no_reply(self, op: int, body: bytes, nodeid: int = 1) -> None:
        self.call(op, body, nodeid)

    def entry(self, op: int, body: bytes, nodeid: int = 1) -> int:
        return abi.ENTRY_OUT.unpack(self.call(op, body, nodeid)).nodeid


def _z(name: bytes) -> bytes:
    return name + b"\0"


def fuse_ops(root: str) -> dict[str, int]:
    """Every served opcode once, on `root` (which must be empty or at least lack our names)."""
    fs = PassthroughFs(FsOptions(source=root, tag="workload"))
    server = Server(fs)
    c = _Client(server)
    c.call(Opcode.INIT, abi.INIT_IN.pack(major=7, minor=37, max_readahead=1 << 17,
                                         flags=INIT_FLAGS & 0xFFFFFFFF, flags2=INIT_FLAGS >> 32),
           nodeid=0)
    c.call(Opcode.LOOKUP, _z(b"missing"), want=errno.ENOENT)
    c.call(Opcode.GETATTR, abi.GETATTR_IN.pack())
    c.call(Opcode.STATFS)

    body = c.call(Opcode.CREATE, abi.CREATE_IN.pack(flags=os.O_RDWR | os.O_CREAT, mode=0o100644,
                                                   umask=0o022) + _z(b"file"))
    f = abi.ENTRY_OUT.unpack(body).nodeid
    fh = abi.OPEN_OUT.unpack(body, abi.ENTRY_OUT.size).fh
    data = bytes(range(256)) * 64
    c.call(Opcode.WRITE, abi.WRITE_IN.pack(fh=fh, offset=0, size=len(data)) + data, f)
    got = c.call(Opcode.READ, abi.READ_IN.pack(fh=fh, offset=0, size=len(data)), f)
    if got != data:
        raise WorkloadError("READ returned other bytes than WRITE wrote")
    c.call(Opcode.FSYNC, abi.FSYNC_IN.pack(fh=fh), f)
    c.call(Opcode.FSYNC, abi.FSYNC_IN.pack(fh=fh, fsync_flags=abi.FUSE_FSYNC_FDATASYNC), f)
    c.call(Opcode.FLUSH, abi.FLUSH_IN.pack(fh=fh), f)
    c.call(Opcode.FALLOCATE, abi.FALLOCATE_IN.pack(fh=fh, offset=0, length=1 << 16), f)
    c.call(Opcode.LSEEK, abi.LSEEK_IN.pack(fh=fh, offset=0, whence=os.SEEK_DATA), f)
    c.call(Opcode.GETATTR, abi.GETATTR_IN.pack(getattr_flags=abi.FUSE_GETATTR_FH, fh=fh), f)

    # SETATTR: mode, owner, size (through the handle and without one), times
    c.call(Opcode.SETATTR, abi.SETATTR_IN.pack(valid=abi.FATTR_MODE, mode=0o100600), f)
    c.call(Opcode.SETATTR, abi.SETATTR_IN.pack(valid=abi.FATTR_UID | abi.FATTR_GID,
                                               uid=1001, gid=1001), f)
    c.call(Opcode.SETATTR, abi.SETATTR_IN.pack(valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=fh,
                                               size=100), f)
    c.call(Opcode.SETATTR, abi.SETATTR_IN.pack(valid=abi.FATTR_SIZE, size=50), f)
    c.call(Opcode.SETATTR, abi.SETATTR_IN.pack(
        valid=abi.FATTR_ATIME | abi.FATTR_MTIME, atime=1, mtime=2), f)
    c.call(Opcode.SETATTR, abi.SETATTR_IN.pack(
        valid=abi.FATTR_ATIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME | abi.FATTR_MTIME_NOW), f)

    # xattrs (user namespace: allowed everywhere)
    c.call(Opcode.SETXATTR, struct.pack("<II", 3, 0) + _z(b"user.k") + b"val", f)  # no SETXATTR_EXT
    c.call(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=64) + _z(b"user.k"), f)
    c.call(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=0) + _z(b"user.k"), f)
    c.call(Opcode.LISTXATTR, abi.GETXATTR_IN.pack(size=256), f)
    c.call(Opcode.REMOVEXATTR, _z(b"user.k"), f)

    # a second file for copy_file_range, then release both
    body = c.call(Opcode.CREATE, abi.CREATE_IN.pack(flags=os.O_RDWR | os.O_CREAT, mode=0o100644,
                                                   umask=0) + _z(b"copy"))
    f2 = abi.ENTRY_OUT.unpack(body).nodeid
    fh2 = abi.OPEN_OUT.unpack(body, abi.ENTRY_OUT.size).fh
    c.call(Opcode.COPY_FILE_RANGE, abi.COPY_FILE_RANGE_IN.pack(
        fh_in=fh, off_in=0, nodeid_out=f2, fh_out=fh2, off_out=0, len=50), f)
    c.call(Opcode.RELEASE, abi.RELEASE_IN.pack(fh=fh2), f2)
    c.call(Opcode.RELEASE, abi.RELEASE_IN.pack(fh=fh, release_flags=abi.FUSE_RELEASE_FLUSH), f)
    fh = abi.OPEN_OUT.unpack(c.call(Opcode.OPEN, abi.OPEN_IN.pack(flags=os.O_RDONLY), f)).fh
    c.call(Opcode.READ, abi.READ_IN.pack(fh=fh, offset=0, size=4096), f)
    c.call(Opcode.RELEASE, abi.RELEASE_IN.pack(fh=fh), f)
    c.call(Opcode.ACCESS, abi.ACCESS_IN.pack(mask=os.R_OK), f, want=errno.EACCES)  # 0600, 1001

    # names: mkdir, mknod (a FIFO: no CAP_MKNOD needed), symlink, link, rename, rename2
    d = c.entry(Opcode.MKDIR, abi.MKDIR_IN.pack(mode=0o40755, umask=0o022) + _z(b"dir"))
    c.entry(Opcode.MKNOD, abi.MKNOD_IN.pack(mode=stat.S_IFIFO | 0o644, rdev=0, umask=0)
            + _z(b"fifo"), d)
    ln = c.entry(Opcode.SYMLINK, _z(b"link") + _z(b"../file"), d)
    c.call(Opcode.READLINK, b"", ln)
    c.entry(Opcode.LINK, abi.LINK_IN.pack(oldnodeid=f) + _z(b"hard"), d)
    c.call(Opcode.RENAME, abi.RENAME_IN.pack(newdir=1) + _z(b"hard") + _z(b"hard2"), d)
    c.call(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=1, flags=abi.RENAME_EXCHANGE)
           + _z(b"file") + _z(b"copy"), 1)
    c.call(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=1, flags=abi.RENAME_NOREPLACE)
           + _z(b"copy") + _z(b"file"), 1, want=errno.EEXIST)

    # directories: READDIR and READDIRPLUS, FSYNCDIR, RELEASEDIR
    for op in (Opcode.READDIR, Opcode.READDIRPLUS):
        dh = abi.OPEN_OUT.unpack(c.call(Opcode.OPENDIR, abi.OPEN_IN.pack(flags=0), 1)).fh
        c.call(op, abi.READ_IN.pack(fh=dh, offset=0, size=8192), 1)
        c.call(Opcode.FSYNCDIR, abi.FSYNC_IN.pack(fh=dh), 1)
        c.call(Opcode.RELEASEDIR, abi.RELEASE_IN.pack(fh=dh), 1)

    # removal and forgetting
    c.call(Opcode.UNLINK, _z(b"fifo"), d)
    c.call(Opcode.UNLINK, _z(b"link"), d)
    c.call(Opcode.RMDIR, _z(b"dir"))
    for name in (b"hard2", b"copy", b"file"):
        c.call(Opcode.UNLINK, _z(name))
    c.no_reply(Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1), f2)
    c.no_reply(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(count=1)
               + struct.pack("<QQ", f, 1))
    c.no_reply(Opcode.DESTROY, b"", 0)
    return {"requests": c.unique}


def virtio_device(root: str) -> int:
    """The device with its worker thread, as the fake driver of test_virtio_fs drives it."""
    g = Guest(FsOptions(source=root, tag="workload"))
    try:
        g.up()
        g.init()
        err, body = g.fuse(Opcode.CREATE, 1, abi.CREATE_IN.pack(
            flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0) + b"dev\0",
            abi.ENTRY_OUT.size + abi.OPEN_OUT.size)
        if err:
            raise WorkloadError(f"device CREATE: {errno.errorcode[err]}")
        nodeid = abi.ENTRY_OUT.unpack(body).nodeid
        fh = abi.OPEN_OUT.unpack(body, abi.ENTRY_OUT.size).fh
        err, _ = g.fuse(Opcode.WRITE, nodeid, abi.WRITE_IN.pack(fh=fh, offset=0, size=4096),
                        abi.WRITE_OUT.size, payload=[b"x" * 4096])
        err2, data = g.fuse(Opcode.READ, nodeid, abi.READ_IN.pack(fh=fh, offset=0, size=4096),
                            4096)
        if err or err2 or data != b"x" * 4096:
            raise WorkloadError("device WRITE/READ failed")
        g.fuse(Opcode.RELEASE, nodeid, abi.RELEASE_IN.pack(fh=fh), 0)
        err, _ = g.fuse(Opcode.UNLINK, 1, b"dev\0", 0)
        if err:
            raise WorkloadError(f"device UNLINK: {errno.errorcode[err]}")
        g.mmio.w(0x70, 0)                          # driver reset: the worker thread is joined
    finally:
        g.close()
    return g.irqs


# ------------------------------------------------------------------------------ vhost-user side


def frontend_send(sock: socket.socket) -> tuple[int, int, int]:
    """The VMM's half: guest memory as a memfd with a request in it, plus kick and call eventfds,
    sent with SCM_RIGHTS. Returns (memfd, kick, call), which the caller keeps."""
    memfd = os.memfd_create("pyvmm-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(memfd, MEMFD_SIZE)
    os.pwrite(memfd, REQUEST_MAGIC, 4096)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    fds = array.array("i", [memfd, kick, call])
    sock.sendmsg([struct.pack("<IQ", 1, MEMFD_SIZE)],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    os.eventfd_write(kick, 1)
    return memfd, kick, call


def frontend_finish(sock: socket.socket) -> None:
    """The VMM's half after the backend answered: read the ack, say bye, read ok."""
    if sock.recv(64) != b"ack:mem":
        raise WorkloadError("no ack from the backend")
    sock.send(b"bye")
    if sock.recv(64) != b"ok":
        raise WorkloadError("no ok from the backend")


def backend_memory(sock_fd: int) -> None:
    """The backend's half: recvmsg the fds, mmap guest memory, serve one kick, signal call."""
    sock = socket.socket(fileno=sock_fd)
    try:
        sock.setblocking(True)                     # CPython: ioctl(FIONBIO)
        fds = array.array("i")
        msg, anc, _flags, _addr = sock.recvmsg(64, socket.CMSG_SPACE(3 * fds.itemsize))
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if len(fds) != 3 or len(msg) != 12:
            raise WorkloadError(f"expected 3 fds and 12 bytes, got {len(fds)} and {len(msg)}")
        memfd, kick, call = fds
        _n, size = struct.unpack("<IQ", msg)
        mem = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(mem)
        ep = select.epoll()
        try:
            ep.register(kick, select.EPOLLIN)
            if not ep.poll(30):
                raise WorkloadError("no kick")
            os.eventfd_read(kick)
            if bytes(view[4096:4096 + len(REQUEST_MAGIC)]) != REQUEST_MAGIC:
                raise WorkloadError("request not visible in shared guest memory")
            view[8192:8192 + len(REPLY_MAGIC)] = REPLY_MAGIC
            os.eventfd_write(call, 1)
            sock.sendmsg([b"ack:", b"mem"])        # a vhost-user reply (sendmsg)
            if sock.recv(64) != b"bye":            # the next message (recvfrom)
                raise WorkloadError("frontend did not say bye")
            sock.send(b"ok")                       # sendto
        finally:
            ep.close()
            view.release()
            mem.close()
            for fd in fds:
                os.close(fd)
    finally:
        sock.detach()
        os.close(sock_fd)


def threads(n: int = 4) -> int:
    """Python threads start and join (clone with thread flags, futex, set_robust_list, rseq)."""
    results: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            results.append(i)

    ts = [threading.Thread(target=work, args=(i,), name=f"workload-{i}") for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if sorted(results) != list(range(n)):
        raise WorkloadError("threads did not all run")
    return n


def log_line() -> None:
    """A device logs (rate-limited) warnings: a LogRecord asks for the pid, a handler writes."""
    log = logging.getLogger("pyvmm.jail.workload")
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("jail workload: a warning from inside (expected)")
    finally:
        log.removeHandler(handler)


def run_all(root: str, sock_fd: int) -> dict[str, int]:
    """The whole workload on `root` (empty directory) with the backend end of a socketpair
    (its peer must be served by frontend_send before and frontend_finish concurrently)."""
    log_line()
    out = fuse_ops(root)
    out["irqs"] = virtio_device(root)
    out["threads"] = threads()
    backend_memory(sock_fd)
    return out


# ------------------------------------------------------------------------------ derivation

START_MARKER = "/pyvmm-jail-workload-start"
END_MARKER = "/pyvmm-jail-workload-end"


def _observed(trace_file: str) -> set[str]:
    import re
    names: set[str] = set()
    started = False
    line_re = re.compile(r"^(?:\d+\s+)?(?:<\.\.\. )?([a-z0-9_]+)[( ]")
    for line in Path(trace_file).read_text().splitlines():
        if not started:
            started = START_MARKER in line
            continue
        if END_MARKER in line:
            break
        m = line_re.match(line)
        if m and not line.startswith(("+++", "---")):
            names.add(m.group(1))
    return names


def _main_traced() -> int:
    """Run the workload (after a marker syscall) in this process, untraced part first."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "share")
        os.mkdir(root)
        front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep = frontend_send(front)
        try:
            os.stat(START_MARKER)
        except FileNotFoundError:
            pass
        finisher = threading.Thread(target=frontend_finish, args=(front,))
        finisher.start()
        run_all(root, back.detach())
        finisher.join()
        try:
            os.stat(END_MARKER)
        except FileNotFoundError:
            pass
        for fd in keep:
            os.close(fd)
        front.close()
    return 0


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--run"]:
        return _main_traced()
    if argv[1:2] != ["--strace"]:
        print(__doc__)
        return 2
    import subprocess
    import tempfile

    from devices.jail import policy
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trace")
        subprocess.run(["strace", "-f", "-qq", "-o", out, sys.executable, __file__, "--run"],
                       check=True)
        seen = _observed(out)
    allowed = set(policy.FS_DEVICE)
    print(f"{len(seen)} system calls after the start marker:")
    print("  " + " ".join(sorted(seen)))
    missing = sorted(seen - allowed)
    print(f"not in the policy ({len(missing)}): {' '.join(missing) or '-'}")
    unused = sorted(allowed - seen)
    print(f"in the policy, not seen here ({len(unused)}): {' '.join(unused) or '-'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
