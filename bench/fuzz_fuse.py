"""Structure-aware fuzzing of the FUSE server + passthrough as a hostile guest would drive it.

Requests are built from the wire structs (`fuse.abi`) with edge-biased field values, names from a
pool of good and hostile components, and node ids / file handles learned from earlier replies, so
most requests get past the framing checks and reach the file system; a fraction is then mutated
(bytes flipped, truncated, extended, the header's len lied about). Sessions are fuzzed too: INIT
twice, DESTROY mid-session, requests before INIT, FORGET of what was never looked up.

After EVERY request the harness checks what a guest must never be able to do to the host:
  * an exception escapes ``Server.handle`` (it must answer or drop, never raise);
  * a reply is malformed (length or unique not matching what was written/asked);
  * anything outside the share changed (a sentinel tree next to the share is fingerprinted);
  * a table lock stays held (the LSEEK wedge of issue 11 was found this way);
  * host fds leak: open fds must equal the baseline plus one per known inode and open handle;
  * the share's limits are exceeded: more node ids than ``max_inodes``, handles than
    ``max_handles``, or directory records kept than ``readdir_buffer`` per handle (each session
    draws either the default limits or small ones, so the limits are reached often);
  * memory grows past the share's documented ceiling (``FsOptions.memory_ceiling``, plus
    :data:`RSS_SLACK` for the interpreter; RSS, sampled).
Findings are printed with the seed and step, and the request bytes, so each one replays.

    python bench/fuzz_fuse.py [--seconds 60] [--seed N] [--steps N]

Run as root it serves a share on a fresh 64 MiB tmpfs (tmpfs is where the LSEEK wedge lived, and
the size bound keeps FALLOCATE/WRITE from filling the host); otherwise a temporary directory with
lengths kept small. Results go to bench/results/fuzz_fuse.json.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.virtio.fs.options import FsOptions  # noqa: E402
from devices.virtio.fs.passthrough import PassthroughFs  # noqa: E402
from fuse import abi  # noqa: E402
from fuse.abi import Opcode  # noqa: E402
from fuse.io import BytesReader, BytesWriter  # noqa: E402
from fuse.server import Server  # noqa: E402

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
I64_MAX = (1 << 63) - 1
#: RSS growth allowed beyond the share's own memory ceiling: the interpreter's arenas, the
#: fuzzer's request and reply buffers (up to 2 MiB each), allocator fragmentation.
RSS_SLACK = 64 << 20
#: Small limits drawn for some sessions, so that ENFILE/EMFILE paths are exercised all the time.
SMALL_LIMITS = {"max_inodes": 24, "max_handles": 16, "readdir_buffer": 1024, "max_write": 65536}

#: Edge values for integer fields, mixed with small random ones.
EDGES = (0, 1, 2, 7, 4095, 4096, 4097, 1 << 16, 1 << 20, (1 << 20) + 1, U32 - 1, U32,
         1 << 32, I64_MAX - 11, I64_MAX - 1, I64_MAX, 1 << 63, U64 - 1, U64)

#: Names that exist in the populated share (or get created), then hostile ones.
GOOD_NAMES = (b"a", b"b", b"dir", b"file", b"link", b"rootlink", b"hardlink", b"fifo", b"new",
              b"new2", b"sub")
BAD_NAMES = (b"x" * 255, b"y" * 256, b"z" * 1100, b".", b"..", b"", b"a/b", b"../outside",
             b"/etc", b"a\0b", b"secret", b"\xff\xfe", b"outside", b"share")
XATTRS = (b"user.a", b"user.b", b"security.capability", b"trusted.overlay.opaque",
          b"system.posix_acl_access", b"security.selinux", b"", b"user." + b"n" * 300)
#: Session ops are rare (each one resets what the fuzzer learned); the rest are weighted towards
#: those that touch host state.
SESSION_OPS = (Opcode.INIT, Opcode.DESTROY)
ALL_OPS = [op for op in Opcode if op not in SESSION_OPS]
WEIGHTED_OPS = ALL_OPS + [Opcode.LOOKUP] * 8 + [Opcode.OPEN, Opcode.CREATE, Opcode.READ,
                                               Opcode.WRITE, Opcode.OPENDIR, Opcode.READDIR,
                                               Opcode.READDIRPLUS, Opcode.LSEEK, Opcode.SETATTR,
                                               Opcode.RENAME2, Opcode.MKNOD, Opcode.SETXATTR,
                                               Opcode.RELEASE, Opcode.FORGET] * 3


@dataclass
class Finding:
    step: int
    kind: str
    detail: str
    request: bytes

    def __str__(self) -> str:
        return f"step {self.step}: {self.kind}: {self.detail} (request {self.request[:96].hex()})"


@dataclass
class Stats:
    requests: int = 0
    mutated: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ok: dict[str, int] = field(default_factory=dict)  # successful replies per opcode
    max_fds_over_baseline: int = 0
    max_rss_growth: int = 0


def _fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about a small tree a guest could change: names, types, modes, owners, sizes,
    times, link targets, xattrs."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            xattrs: tuple[Any, ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    xattrs = tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)))
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                            st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, link,
                                            xattrs)
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def fuzz_root(use_tmpfs: bool | None = None) -> Iterator[tuple[Path, bool]]:
    """A directory holding ``share/`` (served) and ``outside/`` (must never change).

    As root the share is its own small tmpfs; yields (root, small_tmpfs)."""
    if use_tmpfs is None:
        use_tmpfs = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="pyvmm-fuzz-") as d:
        root = Path(d)
        share, outside = root / "share", root / "outside"
        share.mkdir()
        outside.mkdir()
        mounted = False
        if use_tmpfs:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "pyvmm-fuzz",
                            str(share)], check=True)
            mounted = True
        try:
            yield root, mounted
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(share)], check=False)


def _populate(root: Path) -> None:
    share, outside = root / "share", root / "outside"
    (outside / "secret").write_bytes(b"host secret")
    (outside / "dir").mkdir(exist_ok=True)
    (outside / "dir" / "inner").write_bytes(b"inner")
    os.setxattr(outside / "secret", b"user.host", b"1")
    (share / "file").write_bytes(os.urandom(5000))
    (share / "dir").mkdir()
    (share / "dir" / "a").write_bytes(b"a")
    (share / "dir" / "b").mkdir()
    os.symlink("../outside/secret", share / "link")
    os.symlink("/", share / "rootlink")
    os.link(share / "file", share / "hardlink")
    os.mkfifo(share / "fifo")


class Fuzzer:
    """One fuzzing session on ``root/share``; ``run()`` returns the findings."""

    #: Chance that a session runs with SMALL_LIMITS instead of the defaults.
    small_limits_odds = 0.5

    def __init__(self, root: Path, seed: int, *, small: bool = True,
                 fs_factory: Callable[[FsOptions], Any] = PassthroughFs) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.root = root
        self.small = small  # keep lengths small (no size-bounded tmpfs under the share)
        _populate(root)
        limits = SMALL_LIMITS if self.rng.random() < self.small_limits_odds else {}
        self.options = FsOptions(source=str(root / "share"), tag="fuzz",
                                 negative_timeout=self.rng.choice((0, 5)), **limits)
        self.fs = fs_factory(self.options)
        self.server = Server(self.fs, max_write=self.options.max_write)
        self.outside_before = _fingerprint(root / "outside")
        self.siblings = sorted(os.listdir(root))
        self.nodeids: list[int] = [1]
        self.handles: list[tuple[int, int]] = []  # (nodeid, fh) pairs the server handed out
        self.hdr_nodeid: int | None = None  # set by body() when it picked a (nodeid, fh) pair
        self.unique = 0
        self.stats = Stats()
        self.findings: list[Finding] = []
        self.fd_baseline = _open_fds() - self._fs_fds()
        self.rss_baseline = _rss()

    # -- generation ------------------------------------------------------------------------------
    def _int(self, bits: int = 64) -> int:
        r = self.rng.random()
        top = (1 << bits) - 1
        if r < 0.4:
            return self.rng.choice(EDGES) & top
        if r < 0.8:
            return self.rng.randrange(0, 1 << 13)
        return self.rng.getrandbits(bits)

    def _len(self) -> int:
        """A size or length: mostly small, sometimes an edge (clamped when unbounded)."""
        v = self._int(64) if self.rng.random() < 0.3 else self.rng.randrange(0, 1 << 17)
        return min(v, 1 << 20) if self.small else v

    def _nodeid(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(self.nodeids)
        if r < 0.95:
            return 1
        return self.rng.choice((0, 2, U64, self._int()))

    def _fh(self) -> int:
        """A handle, usually one the server handed out, with its own node id in the header."""
        if self.handles and self.rng.random() < 0.85:
            nodeid, fh = self.rng.choice(self.handles)
            self.hdr_nodeid = nodeid
            return fh
        return self.rng.choice((0, 1, U64, self._int()))

    def _name(self) -> bytes:
        r = self.rng.random()
        if r < 0.8:
            return self.rng.choice(GOOD_NAMES)
        if r < 0.95:
            return self.rng.choice(BAD_NAMES)
        return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(1, 12)))

    def _mode(self) -> int:
        kind = self.rng.choice((stat.S_IFREG, stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK,
                                stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFLNK, 0))
        return kind | self.rng.choice((0o644, 0o755, 0o4755, 0o6755, 0o2755, 0o1777, 0o7777,
                                       self.rng.getrandbits(12)))

    def body(self, op: Opcode) -> bytes:  # noqa: C901 - one case per opcode is the point
        i, n, r = self._int, self._name, self.rng
        nul = b"\0"
        if op == Opcode.INIT:
            return abi.INIT_IN.pack(major=r.choice((7, 7, 7, 6, 8)), minor=r.choice((37, 31, 26, 99)),
                                    max_readahead=i(32), flags=r.choice((U32, 0, i(32))),
                                    flags2=i(32))
        if op in (Opcode.LOOKUP, Opcode.UNLINK, Opcode.RMDIR):
            return n() + nul
        if op in (Opcode.FORGET,):
            return abi.FORGET_IN.pack(nlookup=r.choice((1, 2, U64, 0)))
        if op == Opcode.BATCH_FORGET:
            count = r.choice((0, 1, 3, 1000, U32))
            items = b"".join(abi.FORGET_ONE.pack(nodeid=self._nodeid(), nlookup=r.choice((1, U64)))
                             for _ in range(min(count, 4)))
            return abi.BATCH_FORGET_IN.pack(count=count) + items
        if op == Opcode.GETATTR:
            return abi.GETATTR_IN.pack(getattr_flags=r.choice((0, 1)), fh=self._fh())
        if op == Opcode.SETATTR:
            valid = i(32) if r.random() < 0.3 else r.choice((1, 2, 4, 8, 16, 32, 64, 128, 512,
                                                             1 << 9 | 8, 1 << 11))
            return abi.SETATTR_IN.pack(valid=valid, fh=self._fh(), size=self._len(),
                                       atime=i(), mtime=i(), ctime=i(), atimensec=i(32),
                                       mtimensec=i(32), mode=self._mode(), uid=r.choice((0, 1000, U32, i(32))),
                                       gid=r.choice((0, 1000, U32, i(32))))
        if op == Opcode.SYMLINK:
            target = r.choice((b"file", b"../outside/secret", b"/etc/passwd", b"", b"x" * 5000))
            return n() + nul + target + nul
        if op == Opcode.MKNOD:
            return abi.MKNOD_IN.pack(mode=self._mode(), rdev=r.choice((0, 0x0103, i(32))),
                                     umask=r.choice((0, 0o022, 0o777))) + n() + nul
        if op == Opcode.MKDIR:
            return abi.MKDIR_IN.pack(mode=self._mode(), umask=r.choice((0, 0o022))) + n() + nul
        if op == Opcode.RENAME:
            return abi.RENAME_IN.pack(newdir=self._nodeid()) + n() + nul + n() + nul
        if op == Opcode.RENAME2:
            return (abi.RENAME2_IN.pack(newdir=self._nodeid(), flags=r.choice((0, 1, 2, 4, 3, i(32))))
                    + n() + nul + n() + nul)
        if op == Opcode.LINK:
            return abi.LINK_IN.pack(oldnodeid=self._nodeid()) + n() + nul
        if op in (Opcode.OPEN, Opcode.OPENDIR):
            return abi.OPEN_IN.pack(flags=r.choice((os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC,
                                                    os.O_RDWR | os.O_APPEND, 3, i(32))))
        if op == Opcode.CREATE:
            return abi.CREATE_IN.pack(flags=r.choice((os.O_RDWR | os.O_CREAT, os.O_CREAT | os.O_EXCL,
                                                      i(32))), mode=self._mode(),
                                      umask=r.choice((0, 0o022))) + n() + nul
        if op in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS):
            return abi.READ_IN.pack(fh=self._fh(), offset=r.choice((0, 0, 1, 2, 5, i())),
                                    size=r.choice((0, 1, 100, 4096, 1 << 17, 1 << 20, (1 << 20) + 1,
                                                   i(32))))
        if op == Opcode.WRITE:
            size = r.choice((0, 1, 10, 4096, self._len() & 0xFFFF))
            data = bytes(min(size, 1 << 16))
            return abi.WRITE_IN.pack(fh=self._fh(), offset=r.choice((0, 10, I64_MAX - 11, i())),
                                     size=size, write_flags=r.choice((0, 1, 4, i(32)))) + data
        if op in (Opcode.RELEASE, Opcode.RELEASEDIR):
            return abi.RELEASE_IN.pack(fh=self._fh(), flags=i(32))
        if op in (Opcode.FSYNC, Opcode.FSYNCDIR):
            return abi.FSYNC_IN.pack(fh=self._fh(), fsync_flags=r.choice((0, 1)))
        if op == Opcode.FLUSH:
            return abi.FLUSH_IN.pack(fh=self._fh(), lock_owner=i())
        if op == Opcode.SETXATTR:
            value = bytes(r.choice((0, 1, 10, 300)))
            head = abi.SETXATTR_IN.pack(size=r.choice((len(value), len(value), i(32))),
                                        flags=r.choice((0, 1, 2, 3)))
            return head + r.choice(XATTRS) + nul + value
        if op in (Opcode.GETXATTR,):
            return abi.GETXATTR_IN.pack(size=r.choice((0, 10, 1 << 16, i(32)))) + r.choice(XATTRS) + nul
        if op == Opcode.LISTXATTR:
            return abi.GETXATTR_IN.pack(size=r.choice((0, 3, 1 << 16, i(32))))
        if op == Opcode.REMOVEXATTR:
            return r.choice(XATTRS) + nul
        if op == Opcode.ACCESS:
            return abi.ACCESS_IN.pack(mask=r.choice((0, 1, 2, 4, 7, i(32))))
        if op == Opcode.FALLOCATE:
            return abi.FALLOCATE_IN.pack(fh=self._fh(), offset=r.choice((0, 4096, I64_MAX, i())),
                                         length=self._len(), mode=r.choice((0, 1, 3, 0x10, i(32))))
        if op == Opcode.LSEEK:
            return abi.LSEEK_IN.pack(fh=self._fh(), offset=r.choice((0, 5, I64_MAX - 1, I64_MAX, i())),
                                     whence=r.choice((0, 1, 2, 3, 4, i(32))))
        if op == Opcode.COPY_FILE_RANGE:
            return abi.COPY_FILE_RANGE_IN.pack(fh_in=self._fh(), off_in=r.choice((0, i())),
                                               nodeid_out=self._nodeid(), fh_out=self._fh(),
                                               off_out=r.choice((0, i())), len=self._len(),
                                               flags=r.choice((0, 0, i())))
        if op == Opcode.INTERRUPT:
            return abi.INTERRUPT_IN.pack(unique=i())
        if op == Opcode.SYNCFS:
            return abi.SYNCFS_IN.pack(padding=r.choice((0, i())))
        return bytes(self.rng.randrange(0, 64))

    def request(self) -> tuple[bytes, Opcode]:
        op = self.rng.choice(WEIGHTED_OPS)
        if self.rng.random() < 0.003 or (not self.server.initialized and self.rng.random() < 0.9):
            op = self.rng.choice((Opcode.INIT, Opcode.INIT, Opcode.INIT, Opcode.DESTROY))
        self.hdr_nodeid = None
        body = self.body(op)
        nodeid = self.hdr_nodeid if self.hdr_nodeid is not None else self._nodeid()
        if op in SESSION_OPS:
            self.nodeids, self.handles = [1], []
        self.unique += 1
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(body), opcode=int(op),
                                 unique=self.unique, nodeid=nodeid,
                                 uid=self.rng.choice((0, 0, 0, 1000, U32)),
                                 gid=self.rng.choice((0, 0, 0, 1000, U32)), pid=1)
        return hdr + body, op

    def mutate(self, req: bytes) -> bytes:
        """Damage a well-formed request the ways a hostile guest can."""
        b = bytearray(req)
        how = self.rng.randrange(5)
        if how == 0 and b:
            for _ in range(self.rng.randrange(1, 6)):
                b[self.rng.randrange(len(b))] = self.rng.getrandbits(8)
        elif how == 1:
            del b[self.rng.randrange(len(b) + 1):]
        elif how == 2:
            b += bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(1, 64)))
        elif how == 3 and len(b) >= 4:
            b[0:4] = self.rng.choice((0, 1, 39, 40, len(b) - 1, len(b) + 1, U32)).to_bytes(4, "little")
        elif len(b) >= 8:
            other = int(self.rng.choice(ALL_OPS)) if self.rng.random() < 0.8 else self._int(32)
            b[4:8] = other.to_bytes(4, "little")  # another opcode with this body
        return bytes(b)

    # -- checks ----------------------------------------------------------------------------------
    def _fs_fds(self) -> int:
        return self.fs.inode_count() + self.fs.handle_count()

    def _locks_held(self) -> list[str]:
        held = []
        for name in ("_inodes", "_handles"):
            table = getattr(self.fs, name, None)
            pins = getattr(table, "_pins", None)
            if pins is not None and pins.lock.held():
                held.append(name)
        return held

    def check(self, step: int, req: bytes, reply: bytes, written: int) -> None:
        def find(kind: str, detail: str) -> None:
            self.findings.append(Finding(step, kind, detail, req))

        if written:
            if written < abi.OUT_HEADER.size:
                find("reply", f"{written} bytes, shorter than an out-header")
            else:
                out = abi.OUT_HEADER.unpack(reply)
                uniq = int.from_bytes(req[8:16], "little") if len(req) >= 16 else None
                if out.len != written or out.unique != uniq or not -4095 <= out.error <= 0:
                    find("reply", f"header {out} for {written} bytes written")
                elif out.error:
                    name = errno.errorcode.get(-out.error, str(-out.error))
                    self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                else:
                    op = Opcode(int.from_bytes(req[4:8], "little")).name
                    self.stats.ok[op] = self.stats.ok.get(op, 0) + 1
                    self._learn(req, reply)
        if held := self._locks_held():
            find("lock", f"table lock(s) held after the request: {held}")
        fds = _open_fds() - self.fd_baseline - self._fs_fds()
        if fds != 0:
            find("fd", f"{fds:+d} fds beyond one per known inode and open handle")
            self.fd_baseline += fds  # report each leak once
        opts = self.options
        inodes, handles = self.fs.inode_count(), self.fs.handle_count()
        kept = self.fs.dir_buffer_bytes()
        if inodes > opts.max_inodes or handles > opts.max_handles \
                or kept > handles * opts.readdir_buffer:
            find("limit", f"{inodes} node ids (max {opts.max_inodes}), {handles} handles (max "
                          f"{opts.max_handles}), {kept} B of directory records kept")
        self.stats.max_fds_over_baseline = max(self.stats.max_fds_over_baseline,
                                               self._fs_fds())
        if sorted(os.listdir(self.root)) != self.siblings:
            find("escape", f"the share's parent now holds {sorted(os.listdir(self.root))}")
            self.siblings = sorted(os.listdir(self.root))
        now = _fingerprint(self.root / "outside")
        if now != self.outside_before:
            changed = sorted(k for k in now.keys() | self.outside_before.keys()
                             if now.get(k) != self.outside_before.get(k))
            find("escape", f"outside the share changed: {changed}")
            self.outside_before = now
        if step % 256 == 0:
            growth = _rss() - self.rss_baseline
            self.stats.max_rss_growth = max(self.stats.max_rss_growth, growth)
            if growth > opts.memory_ceiling + RSS_SLACK:
                find("memory", f"RSS grew by {growth >> 20} MiB, beyond the share's ceiling of"
                               f" {opts.memory_ceiling >> 20} MiB + {RSS_SLACK >> 20} MiB")
                self.rss_baseline = _rss()

    def _learn(self, req: bytes, reply: bytes) -> None:
        """Remember node ids and handles the server handed out, to aim later requests at them."""
        opcode = int.from_bytes(req[4:8], "little")
        payload = reply[abi.OUT_HEADER.size:]
        with contextlib.suppress(Exception):
            if opcode in (Opcode.LOOKUP, Opcode.MKDIR, Opcode.MKNOD, Opcode.SYMLINK, Opcode.LINK,
                          Opcode.CREATE) and len(payload) >= abi.ENTRY_OUT.size:
                nodeid = abi.ENTRY_OUT.unpack(payload).nodeid
                if nodeid and nodeid not in self.nodeids:
                    self.nodeids.append(nodeid)
            if opcode == Opcode.CREATE and len(payload) >= abi.ENTRY_OUT.size + abi.OPEN_OUT.size:
                self.handles.append((abi.ENTRY_OUT.unpack(payload).nodeid,
                                     abi.OPEN_OUT.unpack(payload, abi.ENTRY_OUT.size).fh))
            if opcode in (Opcode.OPEN, Opcode.OPENDIR) and len(payload) >= abi.OPEN_OUT.size:
                nodeid = int.from_bytes(req[16:24], "little")
                self.handles.append((nodeid, abi.OPEN_OUT.unpack(payload).fh))
            if opcode in (Opcode.RELEASE, Opcode.RELEASEDIR):
                pair = (int.from_bytes(req[16:24], "little"), abi.RELEASE_IN.unpack(req, 40).fh)
                if pair in self.handles:
                    self.handles.remove(pair)
        del self.nodeids[64:], self.handles[64:]

    # -- loop ------------------------------------------------------------------------------------
    def step(self, step: int) -> None:
        req, _op = self.request()
        if self.rng.random() < 0.15:
            req = self.mutate(req)
            self.stats.mutated += 1
        room = 1 << 21 if self.rng.random() < 0.85 else self.rng.choice((1 << 12, 100, 16, 0))
        writer = BytesWriter(room)
        try:
            written = self.server.handle(BytesReader(req), writer)
        except BaseException as e:  # noqa: BLE001 - exactly what we are looking for
            self.findings.append(Finding(step, "exception", f"{type(e).__name__}: {e}", req))
            return
        finally:
            self.stats.requests += 1
        self.check(step, req, writer.data, written)

    def run(self, *, steps: int | None = None, seconds: float | None = None) -> list[Finding]:
        deadline = time.monotonic() + seconds if seconds else None
        n = 0
        while (steps is None or n < steps) and (deadline is None or time.monotonic() < deadline):
            n += 1
            self.step(n)
        return self.findings

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fs.destroy()


def fuzz(seed: int, *, steps: int | None = None, seconds: float | None = None,
         use_tmpfs: bool | None = None,
         fs_factory: Callable[[FsOptions], Any] = PassthroughFs) -> tuple[list[Finding], Stats]:
    with fuzz_root(use_tmpfs) as (root, bounded):
        f = Fuzzer(root, seed, small=not bounded, fs_factory=fs_factory)
        try:
            return f.run(steps=steps, seconds=seconds), f.stats
        finally:
            f.close()


def main() -> None:
    import logging
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--steps", type=int, default=None, help="stop after N requests per seed")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: time-based)")
    p.add_argument("--seeds", type=int, default=1, help="sessions, one seed each")
    args = p.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the server logs what hostile input it drops
    from bench.common import write_result
    first = args.seed if args.seed is not None else int(time.time())
    t0 = time.monotonic()
    total, findings, ok, errors, rss = 0, [], {}, {}, 0
    for seed in range(first, first + args.seeds):
        found, stats = fuzz(seed, steps=args.steps, seconds=args.seconds / args.seeds)
        total += stats.requests
        rss = max(rss, stats.max_rss_growth)
        for op, count in stats.ok.items():
            ok[op] = ok.get(op, 0) + count
        for name, count in stats.errors.items():
            errors[name] = errors.get(name, 0) + count
        findings += [f"seed {seed} {f}" for f in found]
        print(f"seed {seed}: {stats.requests} requests ({stats.mutated} mutated), "
              f"{len(found)} findings", file=sys.stderr)
    duration = time.monotonic() - t0
    write_result("fuzz_fuse", {"seeds": [first, first + args.seeds - 1], "requests": total,
                               "duration_s": round(duration, 1),
                               "requests_per_s": round(total / duration),
                               "successful_replies": dict(sorted(ok.items())),
                               "error_replies": dict(sorted(errors.items())),
                               "max_rss_growth_mib": round(rss / 2**20, 1),
                               "findings": len(findings), "first_findings": findings[:20]})
    if findings:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
