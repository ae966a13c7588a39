"""fuse.server.Server driven with BytesReader/BytesWriter against the in-memory MemFS."""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from pathlib import Path

import pytest

from fuse import abi
from fuse.abi import Opcode
from fuse.filesystem import DirEntry, Entry, FileSystem, InitReply
from fuse.io import BytesReader, BytesWriter
from fuse.metrics import Metrics
from fuse.server import Server
from test_fuse_memfs import INIT_FLAGS_61, MemFS, cstr, do_init, init_body, request, send

OH = abi.OUT_HEADER.size


def ok(r):
    assert r is not None, "no reply"
    assert r.error == 0, f"error {errno.errorcode.get(-r.error, r.error)}"
    return r


def err(r, e: int) -> None:
    assert r is not None, "no reply"
    assert r.error == -e, f"expected -{errno.errorcode[e]}, got {r.error}"
    assert r.len == OH and r.payload == b""


def lookup(server: Server, parent: int, name: bytes):
    return send(server, request(Opcode.LOOKUP, cstr(name), nodeid=parent))


def entry_of(r):
    return abi.ENTRY_OUT.unpack(ok(r).payload)


def open_file(server: Server, nodeid: int, flags: int = os.O_RDWR) -> int:
    r = ok(send(server, request(Opcode.OPEN, abi.OPEN_IN.pack(flags=flags), nodeid=nodeid)))
    return abi.OPEN_OUT.unpack(r.payload).fh


def still_serving(server: Server) -> None:
    r = send(server, request(Opcode.GETATTR, abi.GETATTR_IN.pack(), nodeid=1))
    assert abi.ATTR_OUT.unpack(ok(r).payload).attr.ino == 1


# ------------------------------------------------------------------------------------------
# INIT


def test_init_negotiates_with_linux_6_1(memfs: MemFS) -> None:
    s = Server(memfs)
    out = do_init(s, max_readahead=131072)
    assert (out.major, out.minor) == (7, 37)
    assert out.max_readahead == 131072
    assert out.max_write == 1 << 20
    assert out.max_pages == 256
    assert out.time_gran == 1
    flags = out.flags | (out.flags2 << 32)
    assert flags & ~INIT_FLAGS_61 == 0, "advertised something the guest did not offer"
    for f in (abi.FUSE_ASYNC_READ, abi.FUSE_BIG_WRITES, abi.FUSE_PARALLEL_DIROPS,
              abi.FUSE_MAX_PAGES, abi.FUSE_INIT_EXT, abi.FUSE_DO_READDIRPLUS,
              abi.FUSE_READDIRPLUS_AUTO):
        assert flags & f, hex(f)
    for f in (abi.FUSE_WRITEBACK_CACHE, abi.FUSE_POSIX_LOCKS, abi.FUSE_FLOCK_LOCKS,
              abi.FUSE_SPLICE_READ, abi.FUSE_HAS_IOCTL_DIR, abi.FUSE_MAP_ALIGNMENT,
              abi.FUSE_HANDLE_KILLPRIV_V2, abi.FUSE_SECURITY_CTX, abi.FUSE_HAS_INODE_DAX,
              abi.FUSE_SETXATTR_EXT, abi.FUSE_POSIX_ACL):
        assert not flags & f, hex(f)
    # the filesystem saw the full 64-bit capability set (flags2 included)
    assert memfs.init_capable == INIT_FLAGS_61
    assert s.initialized and s.minor == 37 and s.flags == flags


def test_init_minor_is_min_of_both(memfs: MemFS) -> None:
    s = Server(memfs)
    assert do_init(s, minor=34).minor == 34
    s2 = Server(memfs)
    assert do_init(s2, minor=99).minor == abi.FUSE_KERNEL_MINOR_VERSION


def test_init_old_short_form_without_init_ext(memfs: MemFS) -> None:
    s = Server(memfs)
    flags = INIT_FLAGS_61 & 0xFFFFFFFF & ~abi.FUSE_INIT_EXT
    out = do_init(s, minor=31, flags=flags, short=True)
    assert out.minor == 31 and out.flags2 == 0
    assert not out.flags & abi.FUSE_INIT_EXT
    assert memfs.init_capable == flags


@pytest.mark.parametrize("major,minor", [(7, 30), (7, 0), (6, 40), (0, 0)])
def test_init_too_old_is_eproto(memfs: MemFS, major: int, minor: int) -> None:
    s = Server(memfs)
    err(send(s, request(Opcode.INIT, init_body(major=major, minor=minor))), errno.EPROTO)
    assert not s.initialized
    err(send(s, request(Opcode.GETATTR, abi.GETATTR_IN.pack())), errno.EIO)


def test_init_newer_major_gets_our_version_only(memfs: MemFS) -> None:
    s = Server(memfs)
    r = ok(send(s, request(Opcode.INIT, init_body(major=8))))
    out = abi.INIT_OUT.unpack(r.payload)
    assert (out.major, out.minor, out.flags) == (7, abi.FUSE_KERNEL_MINOR_VERSION, 0)
    assert not s.initialized and memfs.init_capable is None


def test_init_truncated_and_ext_without_flags2(memfs: MemFS) -> None:
    s = Server(memfs)
    err(send(s, request(Opcode.INIT, init_body()[:12])), errno.EINVAL)
    err(send(s, request(Opcode.INIT, init_body(short=True, flags=abi.FUSE_INIT_EXT))),
        errno.EINVAL)
    assert not s.initialized


def test_writeback_only_when_fs_asks(tmp_path: Path) -> None:
    fs = MemFS(tmp_path, want=abi.FUSE_WRITEBACK_CACHE | abi.FUSE_POSIX_LOCKS
               | abi.FUSE_SECURITY_CTX | abi.FUSE_HANDLE_KILLPRIV | abi.FUSE_CACHE_SYMLINKS)
    out = do_init(Server(fs))
    flags = out.flags | out.flags2 << 32
    assert flags & abi.FUSE_WRITEBACK_CACHE and flags & abi.FUSE_CACHE_SYMLINKS
    # never honoured by this server, whatever the fs wants
    assert not flags & (abi.FUSE_POSIX_LOCKS | abi.FUSE_SECURITY_CTX)
    # KILLPRIV is meaningless with a guest-side writeback cache
    assert not flags & abi.FUSE_HANDLE_KILLPRIV
    # the guest must also be capable
    out = do_init(Server(fs), flags=INIT_FLAGS_61 & ~abi.FUSE_WRITEBACK_CACHE)
    assert not out.flags & abi.FUSE_WRITEBACK_CACHE
    fs.close()


def test_readdirplus_flags_only_when_the_fs_reports_them(tmp_path: Path) -> None:
    """init() says what the filesystem supports; the server never inspects its class."""
    plus = abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO

    class NoPlus(MemFS):
        readdirplus = FileSystem.readdirplus

        def init(self, capable: int) -> InitReply:
            return InitReply(flags=super().init(capable).flags & ~plus)

    fs = NoPlus(tmp_path)
    out = do_init(Server(fs))
    assert not out.flags & plus
    fs.close()


def test_init_must_return_an_init_reply(tmp_path: Path) -> None:
    class OldShape(MemFS):
        def init(self, capable: int) -> int:  # type: ignore[override]
            return abi.FUSE_DO_READDIRPLUS

    fs = OldShape(tmp_path)
    s = Server(fs)
    err(send(s, request(Opcode.INIT, init_body())), errno.EIO)
    assert not s.initialized
    fs.close()


def test_session_masks_what_the_fs_wants_with_what_the_guest_offers(tmp_path: Path) -> None:
    """The filesystem does no masking itself: one owner (fuse.session) for the INIT flags."""
    fs = MemFS(tmp_path, want=abi.FUSE_WRITEBACK_CACHE | abi.FUSE_CACHE_SYMLINKS)
    out = do_init(Server(fs), flags=abi.FUSE_ASYNC_READ | abi.FUSE_CACHE_SYMLINKS)
    assert fs.init_capable == abi.FUSE_ASYNC_READ | abi.FUSE_CACHE_SYMLINKS
    assert out.flags == abi.FUSE_ASYNC_READ | abi.FUSE_CACHE_SYMLINKS
    assert out.flags2 == 0
    fs.close()


def test_max_write_parameter(memfs: MemFS) -> None:
    s = Server(memfs, max_write=128 * 1024)
    out = do_init(s)
    assert out.max_write == 131072 and out.max_pages == 32
    with pytest.raises(ValueError):
        Server(memfs, max_write=100)


def test_requests_before_init(memfs: MemFS) -> None:
    s = Server(memfs)
    err(send(s, request(Opcode.LOOKUP, cstr(b"x"))), errno.EIO)
    assert send(s, request(Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1), nodeid=5)) is None
    assert not any(c[0] in ("lookup", "forget") for c in memfs.calls)


def test_init_error_from_fs(tmp_path: Path) -> None:
    class Refuses(MemFS):
        def init(self, capable: int) -> int:
            raise OSError(errno.EACCES, "no")

    fs = Refuses(tmp_path)
    s = Server(fs)
    err(send(s, request(Opcode.INIT, init_body())), errno.EACCES)
    assert not s.initialized


def test_base_filesystem_answers_enosys(tmp_path: Path) -> None:
    s = Server(FileSystem())
    err(send(s, request(Opcode.INIT, init_body())), errno.ENOSYS)

    class OnlyInit(FileSystem):
        def init(self, capable: int) -> InitReply:
            return InitReply()

    s = Server(OnlyInit())
    do_init(s)
    err(send(s, request(Opcode.LOOKUP, cstr(b"a"))), errno.ENOSYS)
    err(send(s, request(Opcode.STATFS)), errno.ENOSYS)
    assert send(s, request(Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1))) is None


def test_reinit_destroys_previous_session(server: Server, memfs: MemFS) -> None:
    do_init(server)
    assert memfs.destroyed == 1
    assert [c[0] for c in memfs.calls].count("init") == 2


def test_destroy_replies_and_ends_session(server: Server, memfs: MemFS) -> None:
    ok(send(server, request(Opcode.DESTROY, nodeid=0)))
    assert memfs.destroyed == 1 and not server.initialized
    err(lookup(server, 1, b"x"), errno.EIO)
    do_init(server)
    err(lookup(server, 1, b"x"), errno.ENOENT)
    assert memfs.destroyed == 1, "the next INIT found no session to end"


def test_end_session_is_the_transport_s_destroy(server: Server, memfs: MemFS) -> None:
    """A device reset ends the session through the server (fuse.session is the one owner of
    FileSystem.init/destroy), so a later INIT does not destroy it a second time."""
    server.end_session()
    assert memfs.destroyed == 1 and not server.initialized and server.flags == 0
    err(lookup(server, 1, b"x"), errno.EIO)
    do_init(server)
    assert memfs.destroyed == 1
    assert [c[0] for c in memfs.calls].count("init") == 2


# ------------------------------------------------------------------------------------------
# LOOKUP and entries


def test_lookup_positive(server: Server, memfs: MemFS) -> None:
    nid = memfs.add_file(1, b"hello.txt", b"0123456789")
    memfs.nodes[nid].rdev = os.makedev(8, 300)
    e = entry_of(lookup(server, 1, b"hello.txt"))
    assert e.nodeid == nid and e.generation == 0
    assert (e.entry_valid, e.entry_valid_nsec) == (1, 500_000_000)
    assert (e.attr_valid, e.attr_valid_nsec) == (1, 500_000_000)
    a = e.attr
    assert a.ino == nid and a.size == 10 and a.blocks == 1 and a.nlink == 1
    assert stat.S_ISREG(a.mode) and a.mode & 0o777 == 0o644
    assert (a.atime, a.atimensec) == (1_700_000_000, 123_456_789)
    assert (a.mtime, a.mtimensec) == (1_700_000_000, 123_456_789)
    assert a.blksize == 4096
    # new_encode_dev(8, 300) as the guest kernel decodes it
    assert a.rdev == (300 & 0xFF) | (8 << 8) | ((300 & ~0xFF) << 12)
    assert memfs.lookups[nid] == 1
    assert memfs.calls[-1] == ("lookup", 1, b"hello.txt")


def test_lookup_negative_entry(tmp_path: Path) -> None:
    fs = MemFS(tmp_path, negative_timeout=2.25)
    m = Metrics()
    s = Server(fs, metrics=m)
    do_init(s)
    r = ok(lookup(s, 1, b"missing"))
    assert r.len == OH + abi.ENTRY_OUT.size
    e = abi.ENTRY_OUT.unpack(r.payload)
    assert e.nodeid == 0
    assert (e.entry_valid, e.entry_valid_nsec) == (2, 250_000_000)
    assert r.payload[abi.ENTRY_OUT.offset_of("attr.ino"):] == bytes(abi.ATTR.size)
    snap = m.snapshot()
    assert snap["lookup_negative"] == 1 and snap["lookup_positive"] == 0
    assert snap["errors"] == {}
    fs.close()


def test_lookup_enoent(server: Server) -> None:
    err(lookup(server, 1, b"nope"), errno.ENOENT)
    err(lookup(server, 999, b"x"), errno.ENOENT)


def test_lookup_dot_and_dotdot_reach_the_fs_with_export_support(server: Server,
                                                                 memfs: MemFS) -> None:
    assert server.flags & abi.FUSE_EXPORT_SUPPORT  # MemFS answers them, and says so
    assert entry_of(lookup(server, 1, b".")).nodeid == 1
    assert entry_of(lookup(server, 1, b"..")).nodeid == 1


@pytest.mark.parametrize("name", [b".", b".."])
def test_lookup_dots_without_export_support_are_einval(tmp_path: Path, name: bytes) -> None:
    """Only NFS export looks up '.'/'..' (fuse_get_dentry/fuse_get_parent); without it the
    answer is the one every op gives for them (crosvm, virtiofsd), and the fs is not asked."""
    class NoExport(MemFS):
        SUPPORTS = MemFS.SUPPORTS & ~abi.FUSE_EXPORT_SUPPORT

    fs = NoExport(tmp_path)
    s = Server(fs)
    do_init(s)
    err(lookup(s, 1, name), errno.EINVAL)
    assert not any(c[0] == "lookup" for c in fs.calls)
    fs.close()


def test_fs_bug_is_eio_logged_once_with_traceback(server: Server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fuse.server")
    err(lookup(server, 1, b"boom"), errno.EIO)
    err(lookup(server, 1, b"boom"), errno.EIO)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "RuntimeError" in tracebacks[0].getMessage()
    still_serving(server)


def test_oserror_without_errno_is_eio(tmp_path: Path) -> None:
    class Weird(MemFS):
        def statfs(self, ctx, nodeid):
            raise OSError("no errno")

    fs = Weird(tmp_path)
    s = Server(fs)
    do_init(s)
    err(send(s, request(Opcode.STATFS)), errno.EIO)


# ------------------------------------------------------------------------------------------
# Each opcode's decode path


def test_mkdir_mknod_symlink_link(server: Server, memfs: MemFS) -> None:
    r = send(server, request(Opcode.MKDIR, abi.MKDIR_IN.pack(mode=0o777, umask=0o022)
                             + cstr(b"d"), uid=1234, gid=55, pid=9))
    d = entry_of(r)
    call = memfs.calls[-1]
    assert call[:5] == ("mkdir", 1, b"d", 0o777, 0o022)
    assert (call[5].uid, call[5].gid, call[5].pid) == (1234, 55, 9)
    assert stat.S_ISDIR(d.attr.mode) and d.attr.mode & 0o777 == 0o755 and d.attr.uid == 1234

    dev = os.makedev(1, 3)
    r = send(server, request(Opcode.MKNOD, abi.MKNOD_IN.pack(
        mode=stat.S_IFCHR | 0o666, rdev=dev, umask=0) + cstr(b"null"), nodeid=d.nodeid))
    n = entry_of(r)
    assert memfs.calls[-1] == ("mknod", d.nodeid, b"null", stat.S_IFCHR | 0o666, dev, 0)
    assert stat.S_ISCHR(n.attr.mode) and n.attr.rdev == dev

    r = send(server, request(Opcode.SYMLINK, cstr(b"ln", b"../some/where"), nodeid=d.nodeid))
    sl = entry_of(r)
    assert memfs.calls[-1] == ("symlink", d.nodeid, b"ln", b"../some/where")
    r = ok(send(server, request(Opcode.READLINK, nodeid=sl.nodeid)))
    assert r.payload == b"../some/where"
    err(send(server, request(Opcode.READLINK, nodeid=d.nodeid)), errno.EINVAL)

    f = memfs.add_file(1, b"f")
    r = send(server, request(Opcode.LINK, abi.LINK_IN.pack(oldnodeid=f) + cstr(b"f2"),
                             nodeid=d.nodeid))
    assert entry_of(r).nodeid == f and entry_of(r).attr.nlink == 2
    assert memfs.calls[-1] == ("link", f, d.nodeid, b"f2")
    err(send(server, request(Opcode.LINK, abi.LINK_IN.pack(oldnodeid=f) + cstr(b"f2"),
                             nodeid=d.nodeid)), errno.EEXIST)


def test_unlink_rmdir_rename_rename2(server: Server, memfs: MemFS) -> None:
    a = memfs.add_file(1, b"a")
    b = memfs.add_file(1, b"b")
    ok(send(server, request(Opcode.RENAME, abi.RENAME_IN.pack(newdir=1) + cstr(b"a", b"c"))))
    assert memfs.calls[-1] == ("rename", 1, b"a", 1, b"c", 0)
    assert memfs.nodes[1].children[b"c"] == a
    err(send(server, request(Opcode.RENAME2, abi.RENAME2_IN.pack(
        newdir=1, flags=abi.RENAME_NOREPLACE) + cstr(b"c", b"b"))), errno.EEXIST)
    ok(send(server, request(Opcode.RENAME2, abi.RENAME2_IN.pack(
        newdir=1, flags=abi.RENAME_EXCHANGE) + cstr(b"c", b"b"))))
    assert memfs.calls[-1] == ("rename", 1, b"c", 1, b"b", abi.RENAME_EXCHANGE)
    assert memfs.nodes[1].children[b"b"] == a and memfs.nodes[1].children[b"c"] == b
    err(send(server, request(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=1, flags=1 << 7)
                             + cstr(b"c", b"b"))), errno.EINVAL)
    ok(send(server, request(Opcode.UNLINK, cstr(b"c"))))
    assert b"c" not in memfs.nodes[1].children
    err(send(server, request(Opcode.UNLINK, cstr(b"c"))), errno.ENOENT)
    ok(send(server, request(Opcode.MKDIR, abi.MKDIR_IN.pack(mode=0o755) + cstr(b"dir"))))
    ok(send(server, request(Opcode.RMDIR, cstr(b"dir"))))
    assert memfs.calls[-1] == ("rmdir", 1, b"dir")
    err(send(server, request(Opcode.RMDIR, cstr(b"dir"))), errno.ENOENT)


def test_getattr_setattr(server: Server, memfs: MemFS) -> None:
    f = memfs.add_file(1, b"f", b"x" * 100)
    r = ok(send(server, request(Opcode.GETATTR, abi.GETATTR_IN.pack(), nodeid=f)))
    out = abi.ATTR_OUT.unpack(r.payload)
    assert out.attr.size == 100 and (out.attr_valid, out.attr_valid_nsec) == (1, 500_000_000)
    assert memfs.calls[-1] == ("getattr", f, None)
    fh = open_file(server, f)
    ok(send(server, request(Opcode.GETATTR, abi.GETATTR_IN.pack(
        getattr_flags=abi.FUSE_GETATTR_FH, fh=fh), nodeid=f)))
    assert memfs.calls[-1] == ("getattr", f, fh)

    valid = (abi.FATTR_SIZE | abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_ATIME
             | abi.FATTR_MTIME | abi.FATTR_FH | abi.FATTR_MTIME_NOW)
    body = abi.SETATTR_IN.pack(valid=valid, fh=fh, size=7, mode=0o600, uid=5, gid=6,
                               atime=1000, atimensec=7, mtime=(-2) & (2**64 - 1),
                               mtimensec=500)
    r = ok(send(server, request(Opcode.SETATTR, body, nodeid=f)))
    req = memfs.calls[-1][2]
    assert (req.valid, req.fh, req.size, req.mode, req.uid, req.gid) == (valid, fh, 7, 0o600,
                                                                        5, 6)
    assert req.atime_ns == 1000 * 10**9 + 7
    assert req.mtime_ns == -2 * 10**9 + 500  # pre-1970 times are signed on the wire
    assert req.mtime_now and not req.atime_now
    a = abi.ATTR_OUT.unpack(r.payload).attr
    assert a.size == 7 and a.mode & 0o7777 == 0o600 and (a.uid, a.gid) == (5, 6)
    # negative time goes back as two's complement seconds with positive nsec
    assert (a.mtime, a.mtimensec) == (2**64 - 2, 500)
    # no FATTR_FH -> fh None
    ok(send(server, request(Opcode.SETATTR, abi.SETATTR_IN.pack(valid=abi.FATTR_MODE,
                                                                 fh=99, mode=0o644),
                            nodeid=f)))
    assert memfs.calls[-1][2].fh is None
    err(send(server, request(Opcode.SETATTR, abi.SETATTR_IN.pack(
        valid=abi.FATTR_ATIME, atimensec=10**9), nodeid=f)), errno.EINVAL)


def test_open_create_flush_release_fsync(server: Server, memfs: MemFS) -> None:
    body = abi.CREATE_IN.pack(flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o666,
                              umask=0o002) + cstr(b"new")
    r = ok(send(server, request(Opcode.CREATE, body)))
    assert r.len == OH + abi.ENTRY_OUT.size + abi.OPEN_OUT.size
    e = abi.ENTRY_OUT.unpack(r.payload)
    o = abi.OPEN_OUT.unpack(r.payload, abi.ENTRY_OUT.size)
    assert memfs.calls[-1] == ("create", 1, b"new", 0o666, os.O_RDWR | os.O_CREAT | os.O_EXCL,
                               0o002)
    assert e.attr.mode & 0o777 == 0o664 and o.open_flags == abi.FOPEN_DIRECT_IO
    assert memfs.handles[o.fh] == e.nodeid
    err(send(server, request(Opcode.CREATE, body)), errno.EEXIST)

    fh = open_file(server, e.nodeid, os.O_RDONLY)
    assert memfs.calls[-1] == ("open", e.nodeid, os.O_RDONLY)
    ok(send(server, request(Opcode.FLUSH, abi.FLUSH_IN.pack(fh=fh, lock_owner=0xABC),
                            nodeid=e.nodeid)))
    assert memfs.calls[-1] == ("flush", e.nodeid, fh, 0xABC)
    ok(send(server, request(Opcode.FSYNC, abi.FSYNC_IN.pack(
        fh=fh, fsync_flags=abi.FUSE_FSYNC_FDATASYNC), nodeid=e.nodeid)))
    assert memfs.calls[-1] == ("fsync", e.nodeid, fh, True)
    ok(send(server, request(Opcode.FSYNC, abi.FSYNC_IN.pack(fh=fh), nodeid=e.nodeid)))
    assert memfs.calls[-1] == ("fsync", e.nodeid, fh, False)
    ok(send(server, request(Opcode.RELEASE, abi.RELEASE_IN.pack(fh=fh, flags=os.O_RDONLY),
                            nodeid=e.nodeid)))
    assert memfs.calls[-1] == ("release", e.nodeid, fh, os.O_RDONLY)
    err(send(server, request(Opcode.RELEASE, abi.RELEASE_IN.pack(fh=fh), nodeid=e.nodeid)),
        errno.EBADF)
    err(send(server, request(Opcode.OPEN, abi.OPEN_IN.pack(), nodeid=1)), errno.EISDIR)


def test_opendir_releasedir_fsyncdir(server: Server, memfs: MemFS) -> None:
    r = ok(send(server, request(Opcode.OPENDIR, abi.OPEN_IN.pack(flags=os.O_RDONLY))))
    o = abi.OPEN_OUT.unpack(r.payload)
    assert o.open_flags == abi.FOPEN_CACHE_DIR
    ok(send(server, request(Opcode.FSYNCDIR, abi.FSYNC_IN.pack(fh=o.fh, fsync_flags=1))))
    assert memfs.calls[-1] == ("fsyncdir", 1, o.fh, True)
    ok(send(server, request(Opcode.RELEASEDIR, abi.RELEASE_IN.pack(fh=o.fh))))
    assert memfs.calls[-1] == ("releasedir", 1, o.fh)


def test_statfs_access(server: Server, memfs: MemFS) -> None:
    r = ok(send(server, request(Opcode.STATFS)))
    st = abi.STATFS_OUT.unpack(r.payload).st
    assert (st.bsize, st.frsize, st.blocks, st.bfree, st.bavail) == (4096, 1024, 1000, 500,
                                                                     400)
    assert (st.files, st.ffree, st.namelen) == (100, 90, 255)
    ok(send(server, request(Opcode.ACCESS, abi.ACCESS_IN.pack(mask=os.R_OK), uid=0)))
    assert memfs.calls[-1] == ("access", 1, os.R_OK)
    err(send(server, request(Opcode.ACCESS, abi.ACCESS_IN.pack(mask=os.W_OK), uid=1000)),
        errno.EACCES)


def test_xattrs(server: Server, memfs: MemFS) -> None:
    # Without FUSE_SETXATTR_EXT the guest sends the 8-byte compat fuse_setxattr_in.
    body = struct.pack("<II", 5, 1) + cstr(b"user.a/b") + b"v\0lue"
    ok(send(server, request(Opcode.SETXATTR, body)))
    assert memfs.calls[-1] == ("setxattr", 1, b"user.a/b", b"v\0lue", 1)
    err(send(server, request(Opcode.SETXATTR, struct.pack("<II", 6, 0) + cstr(b"user.x")
                             + b"short")), errno.EINVAL)
    err(send(server, request(Opcode.SETXATTR, struct.pack("<II", 1 << 20, 0)
                             + cstr(b"user.x"))), errno.E2BIG)

    r = ok(send(server, request(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=0)
                                + cstr(b"user.a/b"))))
    assert abi.GETXATTR_OUT.unpack(r.payload).size == 5
    r = ok(send(server, request(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=64)
                                + cstr(b"user.a/b"))))
    assert r.payload == b"v\0lue"
    err(send(server, request(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=2)
                             + cstr(b"user.a/b"))), errno.ERANGE)
    err(send(server, request(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=10)
                             + cstr(b"user.none"))), errno.ENODATA)
    err(send(server, request(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=10) + cstr(b""))),
        errno.EINVAL)
    err(send(server, request(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=10)
                             + cstr(b"u" * 300))), errno.ERANGE)

    ok(send(server, request(Opcode.SETXATTR, struct.pack("<II", 1, 0) + cstr(b"user.b") + b"x")))
    r = ok(send(server, request(Opcode.LISTXATTR, abi.GETXATTR_IN.pack(size=0))))
    assert abi.GETXATTR_OUT.unpack(r.payload).size == len(b"user.a/b\0user.b\0")
    r = ok(send(server, request(Opcode.LISTXATTR, abi.GETXATTR_IN.pack(size=100))))
    assert r.payload == b"user.a/b\0user.b\0"
    err(send(server, request(Opcode.LISTXATTR, abi.GETXATTR_IN.pack(size=3))), errno.ERANGE)
    ok(send(server, request(Opcode.REMOVEXATTR, cstr(b"user.b"))))
    err(send(server, request(Opcode.REMOVEXATTR, cstr(b"user.b"))), errno.ENODATA)


def test_setxattr_ext_form_when_negotiated(tmp_path: Path) -> None:
    fs = MemFS(tmp_path, want=abi.FUSE_SETXATTR_EXT)
    s = Server(fs)
    assert do_init(s).flags & abi.FUSE_SETXATTR_EXT
    body = abi.SETXATTR_IN.pack(size=3, flags=2, setxattr_flags=1) + cstr(b"user.k") + b"abc"
    ok(send(s, request(Opcode.SETXATTR, body)))
    assert fs.calls[-1] == ("setxattr", 1, b"user.k", b"abc", 2)
    fs.close()


def test_fallocate_lseek_copy_file_range(server: Server, memfs: MemFS) -> None:
    a = memfs.add_file(1, b"a", b"hello world")
    b = memfs.add_file(1, b"b")
    fa, fb = open_file(server, a), open_file(server, b)
    ok(send(server, request(Opcode.FALLOCATE, abi.FALLOCATE_IN.pack(
        fh=fb, offset=0, length=8192), nodeid=b)))
    assert memfs.calls[-1] == ("fallocate", b, fb, 0, 0, 8192)
    assert os.fstat(memfs.nodes[b].fd).st_size == 8192
    err(send(server, request(Opcode.FALLOCATE, abi.FALLOCATE_IN.pack(
        fh=fb, mode=3, length=1), nodeid=b)), errno.EOPNOTSUPP)
    err(send(server, request(Opcode.FALLOCATE, abi.FALLOCATE_IN.pack(
        fh=fb, offset=2**63, length=1), nodeid=b)), errno.EINVAL)

    r = ok(send(server, request(Opcode.LSEEK, abi.LSEEK_IN.pack(
        fh=fa, offset=3, whence=os.SEEK_DATA), nodeid=a)))
    assert abi.LSEEK_OUT.unpack(r.payload).offset == 3
    err(send(server, request(Opcode.LSEEK, abi.LSEEK_IN.pack(
        fh=fa, offset=100, whence=os.SEEK_DATA), nodeid=a)), errno.ENXIO)

    r = ok(send(server, request(Opcode.COPY_FILE_RANGE, abi.COPY_FILE_RANGE_IN.pack(
        fh_in=fa, off_in=6, nodeid_out=b, fh_out=fb, off_out=1, len=2**64 - 1), nodeid=a)))
    assert abi.WRITE_OUT.unpack(r.payload).size == 5
    call = memfs.calls[-1]
    assert call[:7] == ("copy_file_range", a, fa, 6, b, fb, 1)
    assert call[7] <= 0xFFFFFFFF  # clamped so the result fits fuse_write_out.size
    assert os.pread(memfs.nodes[b].fd, 6, 0) == b"\0world"


def test_forget_batch_forget_interrupt_have_no_reply(server: Server, memfs: MemFS) -> None:
    memfs.add_file(1, b"f")
    nid = entry_of(lookup(server, 1, b"f")).nodeid
    entry_of(lookup(server, 1, b"f"))
    assert memfs.lookups[nid] == 2
    w = BytesWriter(4096)
    assert server.handle(BytesReader(request(Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1),
                                             nodeid=nid)), w) == 0
    assert w.bytes_written == 0 and memfs.lookups[nid] == 1
    body = abi.BATCH_FORGET_IN.pack(count=2) + abi.FORGET_ONE.pack(nodeid=nid, nlookup=1) \
        + abi.FORGET_ONE.pack(nodeid=77, nlookup=3)
    assert send(server, request(Opcode.BATCH_FORGET, body, nodeid=0)) is None
    assert memfs.calls[-1] == ("batch_forget", [(nid, 1), (77, 3)])
    assert memfs.lookups[nid] == 0
    # count larger than the payload: dropped, nothing forgotten
    n_calls = len(memfs.calls)
    assert send(server, request(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(count=1000)
                                + abi.FORGET_ONE.pack(nodeid=nid, nlookup=1))) is None
    assert len(memfs.calls) == n_calls
    assert send(server, request(Opcode.INTERRUPT, abi.INTERRUPT_IN.pack(unique=5))) is None
    # FORGET with no writable buffer at all (as on the hiprio queue)
    assert server.handle(BytesReader(request(Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1),
                                             nodeid=nid)), BytesWriter(0)) == 0
    still_serving(server)


def test_op_table_no_reply_rows_are_the_abi_s() -> None:
    """The kernel decides which opcodes get no reply (abi.NO_REPLY_OPCODES); the table agrees."""
    from fuse.ops import NO_REPLY, OPS
    assert {op for op, row in OPS.items() if row.reply is NO_REPLY} == set(abi.NO_REPLY_OPCODES)


@pytest.mark.parametrize("op", [Opcode.GETLK, Opcode.SETLK, Opcode.SETLKW, Opcode.BMAP,
                                Opcode.IOCTL, Opcode.POLL, Opcode.SYNCFS, Opcode.TMPFILE])
def test_unserved_opcodes_are_enosys(server: Server, op: Opcode) -> None:
    err(send(server, request(op, bytes(64))), errno.ENOSYS)


# ------------------------------------------------------------------------------------------
# READ / WRITE through real files


def test_write_then_read_through_real_file(tmp_path: Path) -> None:
    fs = MemFS(tmp_path)
    m = Metrics()
    s = Server(fs, metrics=m)
    do_init(s)
    f = fs.add_file(1, b"data")
    fh = open_file(s, f)
    payload = os.urandom(200_000)
    body = abi.WRITE_IN.pack(fh=fh, offset=4096, size=len(payload), write_flags=3) + payload
    r = ok(send(s, request(Opcode.WRITE, body, nodeid=f)))
    assert abi.WRITE_OUT.unpack(r.payload).size == len(payload)
    assert fs.calls[-1] == ("write", f, fh, len(payload), 4096, 3)
    with open(tmp_path / f"data{f}", "rb") as fp:
        on_disk = fp.read()
    assert on_disk == bytes(4096) + payload

    r = ok(send(s, request(Opcode.READ, abi.READ_IN.pack(fh=fh, offset=4000, size=100_000),
                           nodeid=f)))
    assert r.len == OH + 100_000
    assert r.payload == (bytes(4096) + payload)[4000:104_000]
    # past EOF: an empty, successful read
    r = ok(send(s, request(Opcode.READ, abi.READ_IN.pack(fh=fh, offset=10**6, size=4096),
                           nodeid=f)))
    assert r.len == OH
    # a writer smaller than the request gets a short read of what fits
    r = ok(send(s, request(Opcode.READ, abi.READ_IN.pack(fh=fh, offset=4096, size=4096),
                           nodeid=f), capacity=OH + 10))
    assert r.payload == payload[:10]
    snap = m.snapshot()
    assert snap["bytes_written"] == len(payload)
    assert snap["bytes_read"] == 100_000 + 10
    fs.close()


def test_read_write_limits(server: Server, memfs: MemFS) -> None:
    f = memfs.add_file(1, b"f", b"abc")
    fh = open_file(server, f)
    big = server.max_write + 1
    err(send(server, request(Opcode.READ, abi.READ_IN.pack(fh=fh, size=big), nodeid=f)),
        errno.ENOMEM)
    err(send(server, request(Opcode.WRITE, abi.WRITE_IN.pack(fh=fh, size=big) + b"x",
                             nodeid=f)), errno.ENOMEM)
    # size larger than the data that follows
    err(send(server, request(Opcode.WRITE, abi.WRITE_IN.pack(fh=fh, size=10) + b"abc",
                             nodeid=f)), errno.EINVAL)
    err(send(server, request(Opcode.READ, abi.READ_IN.pack(fh=fh, size=1, offset=2**63),
                             nodeid=f)), errno.EINVAL)
    # fs error after the header slot was reserved: a clean 16-byte error reply
    err(send(server, request(Opcode.READ, abi.READ_IN.pack(fh=fh + 1, size=10), nodeid=f)),
        errno.EBADF)
    assert not any(c[0] == "write" for c in memfs.calls)
    still_serving(server)


def test_read_returning_nonsense_is_eio(tmp_path: Path) -> None:
    class Liar(MemFS):
        def read(self, ctx, nodeid, fh, writer, size, offset):
            return size + 100  # claims more than it wrote

    fs = Liar(tmp_path)
    s = Server(fs)
    do_init(s)
    err(send(s, request(Opcode.READ, abi.READ_IN.pack(size=10))), errno.EIO)


# ------------------------------------------------------------------------------------------
# READDIR / READDIRPLUS


def parse_dirents(payload: bytes, plus: bool) -> list[tuple]:
    out, pos = [], 0
    base = abi.FUSE_NAME_OFFSET_DIRENTPLUS if plus else abi.FUSE_NAME_OFFSET
    while pos < len(payload):
        assert pos % 8 == 0
        entry = None
        if plus:
            entry = abi.ENTRY_OUT.unpack(payload, pos)
            d = abi.DIRENT.unpack(payload, pos + abi.ENTRY_OUT.size)
        else:
            d = abi.DIRENT.unpack(payload, pos)
        name = payload[pos + base:pos + base + d.namelen]
        size = abi.direntplus_size(d.namelen) if plus else abi.dirent_size(d.namelen)
        assert payload[pos + base + d.namelen:pos + size] == bytes(size - base - d.namelen)
        out.append((d.ino, d.off, d.type, name, entry))
        pos += size
    assert pos == len(payload)
    return out


def _names(n: int) -> list[bytes]:
    return [b"f" * (1 + i % 13) + str(i).encode() for i in range(n)]


def test_readdir_packs_everything_that_fits(server: Server, memfs: MemFS) -> None:
    names = _names(30)
    for nm in names:
        memfs.add_file(1, nm)
    r = ok(send(server, request(Opcode.READDIR, abi.READ_IN.pack(fh=0, offset=0, size=4096))))
    ents = parse_dirents(r.payload, plus=False)
    assert [e[3] for e in ents] == [b".", b".."] + sorted(names)
    assert [e[1] for e in ents] == list(range(1, 33))
    assert ents[0][2] == abi.DT_DIR and ents[2][2] == abi.DT_REG
    assert ents[2][0] == memfs.nodes[1].children[sorted(names)[0]]


@pytest.mark.parametrize("size", [40, 48, 100, 333, 1000])  # >= the largest dirent
def test_readdir_resumes_and_stops_consuming(server: Server, memfs: MemFS, size: int) -> None:
    names = _names(25)
    for nm in names:
        memfs.add_file(1, nm)
    seen, offset, pages = [], 0, 0
    while True:
        before = memfs.readdir_yielded
        r = ok(send(server, request(Opcode.READDIR, abi.READ_IN.pack(offset=offset,
                                                                      size=size))))
        assert r.len - OH <= size
        ents = parse_dirents(r.payload, plus=False)
        # the iterator is advanced at most one entry past what was sent
        assert memfs.readdir_yielded - before <= len(ents) + 1
        if not ents:
            break
        seen += [e[3] for e in ents]
        offset = ents[-1][1]
        pages += 1
        assert pages < 100
    assert seen == [b".", b".."] + sorted(names)


def test_readdir_first_entry_too_big_gives_empty_reply(server: Server, memfs: MemFS) -> None:
    r = ok(send(server, request(Opcode.READDIR, abi.READ_IN.pack(size=16))))
    assert r.len == OH


def test_readdir_size_limits(server: Server) -> None:
    err(send(server, request(Opcode.READDIR, abi.READ_IN.pack(size=server.max_write + 1))),
        errno.ENOMEM)
    err(send(server, request(Opcode.READDIRPLUS, abi.READ_IN.pack(size=2**32 - 1))),
        errno.ENOMEM)
    # a writer smaller than `size` bounds the reply instead
    r = ok(send(server, request(Opcode.READDIR, abi.READ_IN.pack(size=4096)), capacity=OH + 40))
    assert len(parse_dirents(r.payload, plus=False)) == 1


def test_readdirplus_pages_keep_lookup_counts_balanced(server: Server, memfs: MemFS) -> None:
    names = _names(12)
    ids = {nm: memfs.add_file(1, nm) for nm in names}
    seen, offset = [], 0
    while True:
        r = ok(send(server, request(Opcode.READDIRPLUS, abi.READ_IN.pack(offset=offset,
                                                                          size=400))))
        ents = parse_dirents(r.payload, plus=True)
        if not ents:
            break
        for _ino, _off, _typ, name, entry in ents:
            if name in (b".", b".."):
                assert entry.nodeid == 0 and entry.entry_valid == 0
                assert entry.attr == abi.ATTR.zero()
            else:
                assert entry.nodeid == ids[name] and entry.attr.ino == ids[name]
                assert (entry.entry_valid, entry.entry_valid_nsec) == (1, 500_000_000)
            seen.append(name)
        offset = ents[-1][1]
    assert seen == [b".", b".."] + sorted(names)
    # every child was sent exactly once; lookups of unsent ones were forgotten
    assert {nm: memfs.lookups[i] for nm, i in ids.items()} == {nm: 1 for nm in names}
    assert any(c[0] == "forget" for c in memfs.calls)


def test_readdirplus_materialised_list_forgets_all_unsent(tmp_path: Path) -> None:
    class Eager(MemFS):
        def readdirplus(self, ctx, nodeid, fh, offset):
            return list(super().readdirplus(ctx, nodeid, fh, offset))

    fs = Eager(tmp_path)
    s = Server(fs)
    do_init(s)
    ids = [fs.add_file(1, nm) for nm in _names(10)]
    r = ok(send(s, request(Opcode.READDIRPLUS, abi.READ_IN.pack(size=600))))
    sent = [e[4].nodeid for e in parse_dirents(r.payload, plus=True) if e[4].nodeid]
    assert 0 < len(sent) < len(ids)
    assert all(fs.lookups[i] == (1 if i in sent else 0) for i in ids)
    fs.close()


def test_readdir_errors_mid_stream(tmp_path: Path) -> None:
    class Flaky(MemFS):
        fail_after = 0

        def readdir(self, ctx, nodeid, fh, offset):
            def gen():
                for i, de in enumerate(MemFS.readdir(self, ctx, nodeid, fh, offset)):
                    if i == self.fail_after:
                        raise OSError(errno.EIO, "disk on fire")
                    yield de
            return gen()

    fs = Flaky(tmp_path)
    s = Server(fs)
    do_init(s)
    err(send(s, request(Opcode.READDIR, abi.READ_IN.pack(size=4096))), errno.EIO)
    fs.fail_after = 2
    r = ok(send(s, request(Opcode.READDIR, abi.READ_IN.pack(size=4096))))
    assert [e[3] for e in parse_dirents(r.payload, plus=False)] == [b".", b".."]
    fs.close()


def test_readdir_skips_invalid_names_from_fs(tmp_path: Path) -> None:
    class Bad(MemFS):
        def readdir(self, ctx, nodeid, fh, offset):
            return iter([DirEntry(5, 1, abi.DT_REG, b"a/b"), DirEntry(6, 2, abi.DT_REG, b""),
                         DirEntry(7, 3, abi.DT_REG, b"ok")])

        def readdirplus(self, ctx, nodeid, fh, offset):
            e = Entry(9, 0, self.stat(self.nodes[1]), 1.0, 1.0)
            self.lookups[9] += 2
            return iter([(DirEntry(9, 1, abi.DT_DIR, b"x\0y"), e),
                         (DirEntry(9, 2, abi.DT_DIR, b"fine"), e)])

    fs = Bad(tmp_path)
    s = Server(fs)
    do_init(s)
    r = ok(send(s, request(Opcode.READDIR, abi.READ_IN.pack(size=4096))))
    assert [e[3] for e in parse_dirents(r.payload, plus=False)] == [b"ok"]
    r = ok(send(s, request(Opcode.READDIRPLUS, abi.READ_IN.pack(size=4096))))
    assert [e[3] for e in parse_dirents(r.payload, plus=True)] == [b"fine"]
    assert fs.lookups[9] == 1  # the skipped one was forgotten
    fs.close()


# ------------------------------------------------------------------------------------------
# Robustness against hostile requests


def test_short_header_is_dropped(server: Server, memfs: MemFS) -> None:
    for n in (0, 1, 39):
        w = BytesWriter(4096)
        assert server.handle(BytesReader(request(Opcode.LOOKUP, cstr(b"x"))[:n]), w) == 0
        assert w.bytes_written == 0
    still_serving(server)


def test_header_len_mismatches(server: Server, memfs: MemFS) -> None:
    memfs.add_file(1, b"f")
    body = cstr(b"f")
    # larger than the data
    err(send(server, request(Opcode.LOOKUP, body, length=40 + len(body) + 1)), errno.EINVAL)
    err(send(server, request(Opcode.LOOKUP, body, length=2**32 - 1)), errno.ENOMEM)
    # a WRITE whose len (and size) claim more data than the chain holds never reaches the fs
    f = memfs.nodes[1].children[b"f"]
    fh = open_file(server, f)
    short = abi.WRITE_IN.pack(fh=fh, size=100) + b"x" * 50
    err(send(server, request(Opcode.WRITE, short, nodeid=f, length=40 + 40 + 100)),
        errno.EINVAL)
    assert not any(c[0] == "write" for c in memfs.calls)
    # smaller than a header
    err(send(server, request(Opcode.LOOKUP, body, length=39)), errno.EINVAL)
    err(send(server, request(Opcode.LOOKUP, body, length=0)), errno.EINVAL)
    # smaller than the data: trailing bytes are ignored, not taken as arguments
    r = send(server, request(Opcode.LOOKUP, body + b"garbage", length=40 + len(body)))
    assert entry_of(r).nodeid == memfs.nodes[1].children[b"f"]
    # ... and a len that cuts the NUL off the name is a malformed name
    err(send(server, request(Opcode.LOOKUP, body, length=40 + len(body) - 1)), errno.EINVAL)
    # 7.38 extensions are not part of the arguments
    r = send(server, request(Opcode.LOOKUP, body + bytes(8), total_extlen=1))
    assert entry_of(r).nodeid == memfs.nodes[1].children[b"f"]
    err(send(server, request(Opcode.LOOKUP, body, total_extlen=100)), errno.EINVAL)
    still_serving(server)


@pytest.mark.parametrize("opcode", [0, 7, 19, 52, 4096, 2**32 - 1,
                                    abi.FUSE_INIT_BSWAP_RESERVED])
def test_bad_opcode_is_enosys(server: Server, opcode: int) -> None:
    err(send(server, request(opcode, b"whatever")), errno.ENOSYS)
    still_serving(server)


NAME_CASES = [
    (b"noterm", errno.EINVAL),
    (b"a/b\0", errno.EINVAL),
    (b"/\0", errno.EINVAL),
    (b"\0", errno.EINVAL),
    (b"", errno.EINVAL),
    (b"a\0b\0", errno.EINVAL),
    (b"x" * 2000 + b"\0", errno.ENAMETOOLONG),
]


@pytest.mark.parametrize("raw,e", NAME_CASES)
def test_bad_names_everywhere(server: Server, memfs: MemFS, raw: bytes, e: int) -> None:
    memfs.add_file(1, b"f")
    requests = [
        request(Opcode.LOOKUP, raw),
        request(Opcode.MKDIR, abi.MKDIR_IN.pack(mode=0o755) + raw),
        request(Opcode.MKNOD, abi.MKNOD_IN.pack(mode=0o644) + raw),
        request(Opcode.CREATE, abi.CREATE_IN.pack(mode=0o644) + raw),
        request(Opcode.UNLINK, raw),
        request(Opcode.RMDIR, raw),
        request(Opcode.LINK, abi.LINK_IN.pack(oldnodeid=2) + raw),
    ]
    if raw.endswith(b"\0") and raw.count(b"\0") == 1:
        requests += [
            request(Opcode.SYMLINK, raw + cstr(b"target")),
            request(Opcode.RENAME, abi.RENAME_IN.pack(newdir=1) + raw + cstr(b"ok")),
            request(Opcode.RENAME, abi.RENAME_IN.pack(newdir=1) + cstr(b"f") + raw),
            request(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=1) + cstr(b"f") + raw),
        ]
    n_calls = len(memfs.calls)
    for data in requests:
        err(send(server, data), e)
    assert len(memfs.calls) == n_calls, "a bad name reached the filesystem"
    still_serving(server)


@pytest.mark.parametrize("name", [b".", b".."])
def test_dot_names_refused_where_entries_change(server: Server, memfs: MemFS,
                                                name: bytes) -> None:
    memfs.add_file(1, b"f")
    n = cstr(name)
    requests = [
        request(Opcode.MKDIR, abi.MKDIR_IN.pack(mode=0o755) + n),
        request(Opcode.MKNOD, abi.MKNOD_IN.pack(mode=0o644) + n),
        request(Opcode.CREATE, abi.CREATE_IN.pack(mode=0o644) + n),
        request(Opcode.SYMLINK, n + cstr(b"t")),
        request(Opcode.UNLINK, n),
        request(Opcode.RMDIR, n),
        request(Opcode.LINK, abi.LINK_IN.pack(oldnodeid=2) + n),
        request(Opcode.RENAME, abi.RENAME_IN.pack(newdir=1) + n + cstr(b"x")),
        request(Opcode.RENAME, abi.RENAME_IN.pack(newdir=1) + cstr(b"f") + n),
        request(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=1) + n + cstr(b"x")),
    ]
    n_calls = len(memfs.calls)
    for data in requests:
        err(send(server, data), errno.EINVAL)
    assert len(memfs.calls) == n_calls


def test_symlink_target_checks(server: Server, memfs: MemFS) -> None:
    err(send(server, request(Opcode.SYMLINK, cstr(b"l", b""))), errno.ENOENT)
    err(send(server, request(Opcode.SYMLINK, cstr(b"l") + b"no-nul")), errno.EINVAL)
    err(send(server, request(Opcode.SYMLINK, cstr(b"l", b"a" * 5000))), errno.ENAMETOOLONG)
    err(send(server, request(Opcode.SYMLINK, cstr(b"l")) ), errno.EINVAL)


FIXED_ARG_OPS = [
    (Opcode.GETATTR, abi.GETATTR_IN), (Opcode.SETATTR, abi.SETATTR_IN),
    (Opcode.MKNOD, abi.MKNOD_IN), (Opcode.MKDIR, abi.MKDIR_IN), (Opcode.RENAME, abi.RENAME_IN),
    (Opcode.RENAME2, abi.RENAME2_IN), (Opcode.LINK, abi.LINK_IN), (Opcode.OPEN, abi.OPEN_IN),
    (Opcode.CREATE, abi.CREATE_IN), (Opcode.READ, abi.READ_IN), (Opcode.WRITE, abi.WRITE_IN),
    (Opcode.RELEASE, abi.RELEASE_IN), (Opcode.FSYNC, abi.FSYNC_IN),
    (Opcode.FLUSH, abi.FLUSH_IN), (Opcode.OPENDIR, abi.OPEN_IN),
    (Opcode.READDIR, abi.READ_IN), (Opcode.READDIRPLUS, abi.READ_IN),
    (Opcode.RELEASEDIR, abi.RELEASE_IN), (Opcode.FSYNCDIR, abi.FSYNC_IN),
    (Opcode.ACCESS, abi.ACCESS_IN), (Opcode.GETXATTR, abi.GETXATTR_IN),
    (Opcode.LISTXATTR, abi.GETXATTR_IN), (Opcode.FALLOCATE, abi.FALLOCATE_IN),
    (Opcode.LSEEK, abi.LSEEK_IN), (Opcode.COPY_FILE_RANGE, abi.COPY_FILE_RANGE_IN),
]


@pytest.mark.parametrize("op,layout", FIXED_ARG_OPS, ids=[o.name for o, _ in FIXED_ARG_OPS])
def test_truncated_in_args(server: Server, memfs: MemFS, op: Opcode, layout) -> None:
    n_calls = len(memfs.calls)
    for cut in (0, 1, layout.size - 1):
        err(send(server, request(op, bytes(layout.size)[:cut])), errno.EINVAL)
    assert len(memfs.calls) == n_calls
    still_serving(server)


def test_truncated_no_reply_ops_are_dropped(server: Server, memfs: MemFS) -> None:
    n_calls = len(memfs.calls)
    for op in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT):
        assert send(server, request(op, b"\1\2\3")) is None
    assert len(memfs.calls) == n_calls
    still_serving(server)


class BrokenWriter(BytesWriter):
    """Room on paper, but the transport fails the write (e.g. guest memory went away)."""

    def write(self, data) -> None:
        raise OSError(errno.EFAULT, "bad address")


def test_entries_that_cannot_be_sent_are_given_back(server: Server, memfs: MemFS) -> None:
    f = memfs.add_file(1, b"f")
    assert server.handle(BytesReader(request(Opcode.LOOKUP, cstr(b"f"))), BrokenWriter(4096)) == 0
    assert memfs.lookups[f] == 0 and ("forget", f, 1) in memfs.calls
    body = abi.CREATE_IN.pack(flags=os.O_RDWR, mode=0o644) + cstr(b"new")
    assert server.handle(BytesReader(request(Opcode.CREATE, body)), BrokenWriter(4096)) == 0
    new = memfs.nodes[1].children[b"new"]
    assert memfs.lookups[new] == 0 and memfs.handles == {}   # forgotten and released
    assert memfs.calls[-1][:3] == ("release", new, 100)
    still_serving(server)


def test_writer_too_small(server: Server, memfs: MemFS) -> None:
    f = memfs.add_file(1, b"f", b"abc")
    # no room even for an out-header: dropped, and the fs never acted
    w = BytesWriter(OH - 1)
    assert server.handle(BytesReader(request(Opcode.LOOKUP, cstr(b"f"))), w) == 0
    assert w.bytes_written == 0 and memfs.lookups[f] == 0
    # room for a header but not the entry: ENOMEM, and no lookup was counted
    err(send(server, request(Opcode.LOOKUP, cstr(b"f")), capacity=OH + 10), errno.ENOMEM)
    err(send(server, request(Opcode.CREATE, abi.CREATE_IN.pack(mode=0o644) + cstr(b"g")),
             capacity=OH + abi.ENTRY_OUT.size), errno.ENOMEM)
    assert memfs.lookups[f] == 0 and b"g" not in memfs.nodes[1].children
    err(send(server, request(Opcode.GETATTR, abi.GETATTR_IN.pack()), capacity=OH + 1),
        errno.ENOMEM)
    err(send(server, request(Opcode.STATFS), capacity=OH + 1), errno.ENOMEM)
    err(send(server, request(Opcode.INIT, init_body()), capacity=OH + 1), errno.ENOMEM)
    # variable-size replies: getxattr value larger than the writer
    ok(send(server, request(Opcode.SETXATTR, struct.pack("<II", 100, 0) + cstr(b"user.v")
                            + b"v" * 100)))
    err(send(server, request(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=200)
                             + cstr(b"user.v")), capacity=OH + 50), errno.ENOMEM)
    still_serving(server)


def test_server_keeps_answering_after_everything(server: Server, memfs: MemFS) -> None:
    junk = [b"", b"\xff" * 39, request(12345, b""), request(Opcode.LOOKUP, b"x", length=1),
            request(Opcode.WRITE, bytes(10)), request(Opcode.READ, abi.READ_IN.pack(size=2**31)),
            request(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(count=2**32 - 1))]
    for data in junk:
        send(server, data)
    still_serving(server)
