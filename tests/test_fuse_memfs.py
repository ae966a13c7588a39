"""A small in-memory FileSystem and FUSE request builders, shared by the tests/test_fuse_* files.

File contents live in real files under a temp directory so READ/WRITE exercise the zero-copy
``write_from_fd``/``read_to_fd`` paths.  Every call is recorded in ``fs.calls`` so tests can
check exactly what the server decoded, and lookup counts are tracked so tests can check that
what the server sends is balanced by forgets.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from fuse import abi
from fuse.filesystem import Context, DirEntry, Entry, FileSystem, InitReply, SetattrRequest
from fuse.io import BytesReader, BytesWriter
from fuse.server import Server


def _err(e: int) -> OSError:
    return OSError(e, os.strerror(e))


class Node:
    def __init__(self, nodeid: int, mode: int, parent: int, *, fd: int | None = None,
                 target: bytes = b"", rdev: int = 0, uid: int = 0, gid: int = 0) -> None:
        self.nodeid = nodeid
        self.mode = mode
        self.parent = parent
        self.fd = fd
        self.target = target
        self.rdev = rdev
        self.uid = uid
        self.gid = gid
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.children: dict[bytes, int] = {}
        self.xattrs: dict[bytes, bytes] = {}
        self.atime_ns = self.mtime_ns = self.ctime_ns = 1_700_000_000_123_456_789


class MemFS(FileSystem):
    TIMEOUT = 1.5

    def __init__(self, tmpdir: Path, *, want: int = 0, negative_timeout: float = 0.0) -> None:
        self.tmpdir = Path(tmpdir)
        self.want = want
        self.negative_timeout = negative_timeout
        self.nodes: dict[int, Node] = {1: Node(1, stat.S_IFDIR | 0o755, 1)}
        self.next_id = itertools.count(2)
        self.next_fh = itertools.count(100)
        self.handles: dict[int, int] = {}
        self.lookups: Counter[int] = Counter()
        self.calls: list[tuple[Any, ...]] = []
        self.readdir_yielded = 0
        self.destroyed = 0
        self.init_capable: int | None = None

    # -- helpers -------------------------------------------------------------------------
    def node(self, nodeid: int) -> Node:
        try:
            return self.nodes[nodeid]
        except KeyError:
            raise _err(errno.ENOENT) from None

    def dir(self, nodeid: int) -> Node:
        n = self.node(nodeid)
        if not stat.S_ISDIR(n.mode):
            raise _err(errno.ENOTDIR)
        return n

    def stat(self, n: Node) -> os.stat_result:
        size = os.fstat(n.fd).st_size if n.fd is not None else len(n.target)
        return os.stat_result(
            (n.mode, n.nodeid, 1, n.nlink, n.uid, n.gid, size, n.atime_ns // 10**9,
             n.mtime_ns // 10**9, n.ctime_ns // 10**9),
            {"st_atime_ns": n.atime_ns, "st_mtime_ns": n.mtime_ns, "st_ctime_ns": n.ctime_ns,
             "st_blocks": (size + 511) // 512, "st_blksize": 4096, "st_rdev": n.rdev})

    def entry(self, n: Node) -> Entry:
        self.lookups[n.nodeid] += 1
        return Entry(n.nodeid, 0, self.stat(n), self.TIMEOUT, self.TIMEOUT)

    def new_node(self, ctx: Context, parent: int, name: bytes, mode: int, **kw: Any) -> Node:
        d = self.dir(parent)
        if name in d.children:
            raise _err(errno.EEXIST)
        nid = next(self.next_id)
        fd = None
        if stat.S_ISREG(mode):
            fd = os.open(self.tmpdir / f"data{nid}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        n = Node(nid, mode, parent, fd=fd, uid=ctx.uid, gid=ctx.gid, **kw)
        self.nodes[nid] = n
        d.children[name] = nid
        if stat.S_ISDIR(mode):
            d.nlink += 1
        return n

    def add_file(self, parent: int, name: bytes, data: bytes = b"") -> int:
        n = self.new_node(Context(0, 0, 0), parent, name, stat.S_IFREG | 0o644)
        os.pwrite(n.fd, data, 0)
        return n.nodeid

    def close(self) -> None:
        for n in self.nodes.values():
            if n.fd is not None:
                os.close(n.fd)
                n.fd = None

    def fh_node(self, nodeid: int, fh: int) -> Node:
        if self.handles.get(fh) != nodeid:
            raise _err(errno.EBADF)
        return self.node(nodeid)

    # -- FileSystem ----------------------------------------------------------------------
    #: What MemFS supports whatever the test asks for: readdirplus, and LOOKUP of '.'/'..'.
    SUPPORTS = abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_EXPORT_SUPPORT

    def init(self, capable: int) -> InitReply:
        self.init_capable = capable
        self.calls.append(("init", capable))
        return InitReply(flags=self.want | self.SUPPORTS)

    def destroy(self) -> None:
        self.destroyed += 1
        self.calls.append(("destroy",))

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        self.calls.append(("lookup", parent, name))
        d = self.dir(parent)
        if name == b".":
            return self.entry(d)
        if name == b"..":
            return self.entry(self.node(d.parent))
        if name == b"boom":
            raise RuntimeError("simulated filesystem bug")
        nid = d.children.get(name)
        if nid is None:
            if self.negative_timeout > 0:
                return Entry.negative(self.negative_timeout)
            raise _err(errno.ENOENT)
        return self.entry(self.nodes[nid])

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.calls.append(("forget", nodeid, nlookup))
        self.lookups[nodeid] -= nlookup

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        self.calls.append(("batch_forget", items))
        for nodeid, n in items:
            self.lookups[nodeid] -= n

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        self.calls.append(("getattr", nodeid, fh))
        return self.stat(self.node(nodeid)), self.TIMEOUT

    def setattr(self, ctx: Context, nodeid: int, req: SetattrRequest
                ) -> tuple[os.stat_result, float]:
        self.calls.append(("setattr", nodeid, req))
        n = self.node(nodeid)
        if req.valid & abi.FATTR_MODE:
            n.mode = (n.mode & ~0o7777) | (req.mode & 0o7777)
        if req.valid & abi.FATTR_UID:
            n.uid = req.uid
        if req.valid & abi.FATTR_GID:
            n.gid = req.gid
        if req.valid & abi.FATTR_SIZE:
            if n.fd is None:
                raise _err(errno.EISDIR)
            os.ftruncate(n.fd, req.size)
        if req.valid & abi.FATTR_ATIME:
            n.atime_ns = req.atime_ns
        if req.valid & abi.FATTR_MTIME:
            n.mtime_ns = req.mtime_ns
        return self.stat(n), self.TIMEOUT

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        n = self.node(nodeid)
        if not stat.S_ISLNK(n.mode):
            raise _err(errno.EINVAL)
        return n.target

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        self.calls.append(("symlink", parent, name, target))
        return self.entry(self.new_node(ctx, parent, name, stat.S_IFLNK | 0o777, target=target))

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        self.calls.append(("mknod", parent, name, mode, rdev, umask))
        return self.entry(self.new_node(ctx, parent, name, mode & ~umask, rdev=rdev))

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self.calls.append(("mkdir", parent, name, mode, umask, ctx))
        return self.entry(self.new_node(ctx, parent, name, stat.S_IFDIR | (mode & ~umask)))

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self.calls.append(("unlink", parent, name))
        d = self.dir(parent)
        nid = d.children.get(name)
        if nid is None:
            raise _err(errno.ENOENT)
        if stat.S_ISDIR(self.nodes[nid].mode):
            raise _err(errno.EISDIR)
        del d.children[name]
        self.nodes[nid].nlink -= 1

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self.calls.append(("rmdir", parent, name))
        d = self.dir(parent)
        nid = d.children.get(name)
        if nid is None:
            raise _err(errno.ENOENT)
        if self.dir(nid).children:
            raise _err(errno.ENOTEMPTY)
        del d.children[name]
        d.nlink -= 1

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        self.calls.append(("rename", parent, name, newparent, newname, flags))
        d, nd = self.dir(parent), self.dir(newparent)
        if name not in d.children:
            raise _err(errno.ENOENT)
        if flags & abi.RENAME_NOREPLACE and newname in nd.children:
            raise _err(errno.EEXIST)
        if flags & abi.RENAME_EXCHANGE:
            if newname not in nd.children:
                raise _err(errno.ENOENT)
            d.children[name], nd.children[newname] = nd.children[newname], d.children[name]
            return
        nd.children[newname] = d.children.pop(name)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        self.calls.append(("link", nodeid, newparent, newname))
        n = self.node(nodeid)
        nd = self.dir(newparent)
        if newname in nd.children:
            raise _err(errno.EEXIST)
        nd.children[newname] = nodeid
        n.nlink += 1
        return self.entry(n)

    def open(self, ctx: Context, nodeid: int, flags: int, open_flags: int = 0
             ) -> tuple[int, int]:
        self.calls.append(("open", nodeid, flags))
        n = self.node(nodeid)
        if n.fd is None:
            raise _err(errno.EISDIR)
        fh = next(self.next_fh)
        self.handles[fh] = nodeid
        return fh, abi.FOPEN_KEEP_CACHE

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int, open_flags: int = 0) -> tuple[Entry, int, int]:
        self.calls.append(("create", parent, name, mode, flags, umask))
        n = self.new_node(ctx, parent, name, stat.S_IFREG | (mode & ~umask & 0o7777))
        fh = next(self.next_fh)
        self.handles[fh] = n.nodeid
        return self.entry(n), fh, abi.FOPEN_DIRECT_IO

    def read(self, ctx: Context, nodeid: int, fh: int, writer: Any, size: int,
             offset: int) -> int:
        self.calls.append(("read", nodeid, fh, size, offset))
        n = self.fh_node(nodeid, fh)
        return writer.write_from_fd(n.fd, size, offset)

    def write(self, ctx: Context, nodeid: int, fh: int, reader: Any, size: int, offset: int,
              write_flags: int) -> int:
        self.calls.append(("write", nodeid, fh, size, offset, write_flags))
        n = self.fh_node(nodeid, fh)
        return reader.read_to_fd(n.fd, size, offset)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        self.calls.append(("flush", nodeid, fh, lock_owner))
        self.fh_node(nodeid, fh)

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.calls.append(("release", nodeid, fh, flags))
        self.fh_node(nodeid, fh)
        del self.handles[fh]

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.calls.append(("fsync", nodeid, fh, datasync))

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        self.calls.append(("opendir", nodeid, flags))
        self.dir(nodeid)
        fh = next(self.next_fh)
        self.handles[fh] = nodeid
        return fh, abi.FOPEN_CACHE_DIR

    def _listing(self, nodeid: int) -> list[tuple[bytes, int, int]]:
        d = self.dir(nodeid)
        out = [(b".", nodeid, abi.DT_DIR), (b"..", d.parent, abi.DT_DIR)]
        for name, nid in sorted(d.children.items()):
            mode = self.nodes[nid].mode
            dt = abi.DT_DIR if stat.S_ISDIR(mode) else (
                abi.DT_LNK if stat.S_ISLNK(mode) else abi.DT_REG)
            out.append((name, nid, dt))
        return out

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        self.calls.append(("readdir", nodeid, fh, offset))
        listing = self._listing(nodeid)

        def gen() -> Iterator[DirEntry]:
            for i in range(offset, len(listing)):
                name, nid, dt = listing[i]
                self.readdir_yielded += 1
                yield DirEntry(nid, i + 1, dt, name)
        return gen()

    def readdirplus(self, ctx: Context, nodeid: int, fh: int, offset: int
                    ) -> Iterator[tuple[DirEntry, Entry]]:
        self.calls.append(("readdirplus", nodeid, fh, offset))
        listing = self._listing(nodeid)

        def gen() -> Iterator[tuple[DirEntry, Entry]]:
            for i in range(offset, len(listing)):
                name, nid, dt = listing[i]
                self.readdir_yielded += 1
                if name in (b".", b".."):
                    e = Entry(0, 0, None, 0.0, 0.0)
                else:
                    e = self.entry(self.nodes[nid])
                yield DirEntry(nid, i + 1, dt, name), e
        return gen()

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        self.calls.append(("releasedir", nodeid, fh))
        self.fh_node(nodeid, fh)
        del self.handles[fh]

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.calls.append(("fsyncdir", nodeid, fh, datasync))

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        self.calls.append(("statfs", nodeid))
        return os.statvfs_result((4096, 1024, 1000, 500, 400, 100, 90, 90, 0, 255))

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        self.calls.append(("access", nodeid, mask))
        self.node(nodeid)
        if mask & os.W_OK and ctx.uid != 0:
            raise _err(errno.EACCES)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        self.calls.append(("setxattr", nodeid, name, value, flags))
        self.node(nodeid).xattrs[name] = value

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        self.calls.append(("getxattr", nodeid, name, size))
        x = self.node(nodeid).xattrs
        if name not in x:
            raise _err(errno.ENODATA)
        if size == 0:
            return len(x[name])
        if len(x[name]) > size:
            raise _err(errno.ERANGE)
        return x[name]

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        self.calls.append(("listxattr", nodeid, size))
        data = b"".join(k + b"\0" for k in sorted(self.node(nodeid).xattrs))
        if size == 0:
            return len(data)
        if len(data) > size:
            raise _err(errno.ERANGE)
        return data

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        self.calls.append(("removexattr", nodeid, name))
        if self.node(nodeid).xattrs.pop(name, None) is None:
            raise _err(errno.ENODATA)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int,
                  length: int) -> None:
        self.calls.append(("fallocate", nodeid, fh, mode, offset, length))
        n = self.fh_node(nodeid, fh)
        if mode:
            raise _err(errno.EOPNOTSUPP)
        os.posix_fallocate(n.fd, offset, length)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        self.calls.append(("lseek", nodeid, fh, offset, whence))
        return os.lseek(self.fh_node(nodeid, fh).fd, offset, whence)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        self.calls.append(("copy_file_range", nodeid_in, fh_in, off_in, nodeid_out, fh_out,
                           off_out, length, flags))
        src, dst = self.fh_node(nodeid_in, fh_in), self.fh_node(nodeid_out, fh_out)
        return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)


# ------------------------------------------------------------------------------------------
# Request building and reply parsing

_unique = itertools.count(1)


def request(opcode: int, body: bytes = b"", *, nodeid: int = 1, unique: int | None = None,
            uid: int = 1000, gid: int = 1000, pid: int = 42, length: int | None = None,
            total_extlen: int = 0) -> bytes:
    u = next(_unique) if unique is None else unique
    total = abi.IN_HEADER.size + len(body) if length is None else length
    return abi.IN_HEADER.struct.pack(total, opcode, u, nodeid, uid, gid, pid, total_extlen,
                                     0) + body


def cstr(*names: bytes) -> bytes:
    return b"".join(n + b"\0" for n in names)


class Reply(NamedTuple):
    returned: int
    len: int
    error: int
    unique: int
    payload: bytes
    raw: bytes


def send(server: Server, data: bytes, capacity: int = 1 << 21, queue: int = 1) -> Reply | None:
    """Run one request; None when nothing was written.  Checks the reply is well-formed."""
    w = BytesWriter(capacity)
    n = server.handle(BytesReader(data), w, queue=queue)
    if n == 0:
        return None
    raw = w.data
    ln, err, unique = abi.OUT_HEADER.struct.unpack_from(raw)
    assert ln == n, f"header len {ln} != returned {n}"
    assert ln <= len(raw)
    assert err <= 0
    if err:
        assert ln == abi.OUT_HEADER.size
    return Reply(n, ln, err, unique, raw[abi.OUT_HEADER.size:ln], raw)


INIT_FLAGS_61 = (
    abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_LOCKS | abi.FUSE_ATOMIC_O_TRUNC | abi.FUSE_EXPORT_SUPPORT
    | abi.FUSE_BIG_WRITES | abi.FUSE_DONT_MASK | abi.FUSE_SPLICE_WRITE | abi.FUSE_SPLICE_MOVE
    | abi.FUSE_SPLICE_READ | abi.FUSE_FLOCK_LOCKS | abi.FUSE_HAS_IOCTL_DIR
    | abi.FUSE_AUTO_INVAL_DATA | abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO
    | abi.FUSE_ASYNC_DIO | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_NO_OPEN_SUPPORT
    | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_HANDLE_KILLPRIV | abi.FUSE_POSIX_ACL
    | abi.FUSE_ABORT_ERROR | abi.FUSE_MAX_PAGES | abi.FUSE_CACHE_SYMLINKS
    | abi.FUSE_NO_OPENDIR_SUPPORT | abi.FUSE_EXPLICIT_INVAL_DATA | abi.FUSE_MAP_ALIGNMENT
    | abi.FUSE_SUBMOUNTS | abi.FUSE_HANDLE_KILLPRIV_V2 | abi.FUSE_SETXATTR_EXT
    | abi.FUSE_INIT_EXT | abi.FUSE_SECURITY_CTX | abi.FUSE_HAS_INODE_DAX
)
"""What a Linux 6.1 virtio-fs guest offers (fs/fuse/inode.c fuse_send_init, DAX included)."""


def init_body(major: int = 7, minor: int = 37, flags: int = INIT_FLAGS_61,
              max_readahead: int = 128 * 1024, short: bool = False) -> bytes:
    if short:
        return struct.pack("<4I", major, minor, max_readahead, flags & 0xFFFFFFFF)
    return abi.INIT_IN.pack(major=major, minor=minor, max_readahead=max_readahead,
                            flags=flags & 0xFFFFFFFF, flags2=flags >> 32)


def do_init(server: Server, **kw: Any) -> Any:
    r = send(server, request(abi.Opcode.INIT, init_body(**kw), nodeid=0))
    assert r is not None and r.error == 0, r
    return abi.INIT_OUT.unpack(r.payload)


def test_memfs_helpers_build_a_valid_lookup(server: Server, memfs: MemFS) -> None:
    """The helpers themselves: a LOOKUP of a file they added comes back positive."""
    nid = memfs.add_file(1, b"f", b"abc")
    r = send(server, request(abi.Opcode.LOOKUP, cstr(b"f"), unique=77))
    assert r is not None and r.error == 0 and r.unique == 77
    out = abi.ENTRY_OUT.unpack(r.payload)
    assert out.nodeid == nid and out.attr.size == 3
