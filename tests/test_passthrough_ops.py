"""PassthroughFs: every operation against real files in a temp directory."""

import errno
import os
import stat
import time

import pytest

from fuse import abi
from fuse.filesystem import Context
from fuse.io import BytesReader, BytesWriter
from tests.passthrough_support import errno_of, make_fs, sreq

CTX = Context(uid=0, gid=0, pid=1)
USER = Context(uid=1234, gid=2345, pid=2)
ROOT = 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@pytest.fixture
def fs(share):
    f = make_fs(share)
    yield f
    f.destroy()


def read_all(fs, nodeid, fh, size=1 << 16, offset=0) -> bytes:
    w = BytesWriter(size)
    n = fs.read(CTX, nodeid, fh, w, size, offset)
    assert n == w.bytes_written
    return w.data


def write(fs, nodeid, fh, data, offset, flags=0) -> int:
    return fs.write(CTX, nodeid, fh, BytesReader(data), len(data), offset, flags)


# ------------------------------------------------------------------ attributes


def test_getattr(fs, share):
    (share / "f").write_bytes(b"12345")
    e = fs.lookup(CTX, ROOT, b"f")
    st, t = fs.getattr(CTX, e.nodeid, None)
    assert st.st_size == 5 and stat.S_ISREG(st.st_mode) and t == 1.0
    assert fs.getattr(CTX, ROOT, None)[0].st_ino == os.stat(share).st_ino


def test_setattr_mode_owner(fs, share):
    (share / "f").write_bytes(b"x")
    e = fs.lookup(CTX, ROOT, b"f")
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_MODE, mode=stat.S_IFREG | 0o1711))
    assert stat.S_IMODE(st.st_mode) == 0o1711
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o1711
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_UID | abi.FATTR_GID, uid=1000, gid=1001))
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_GID, gid=7))
    assert (st.st_uid, st.st_gid) == (1000, 7)
    h = os.stat(share / "f")
    assert (h.st_uid, h.st_gid) == (1000, 7)


def test_setattr_size_with_and_without_handle(fs, share):
    (share / "f").write_bytes(b"0123456789")
    e = fs.lookup(CTX, ROOT, b"f")
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_SIZE, size=4))
    assert st.st_size == 4 and (share / "f").read_bytes() == b"0123"
    fh, _ = fs.open(CTX, e.nodeid, os.O_RDWR)
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_SIZE | abi.FATTR_FH, fh=fh, size=2))
    assert (share / "f").read_bytes() == b"01"
    # A read-only handle still works (falls back to a write-only reopen).
    rfh, _ = fs.open(CTX, e.nodeid, os.O_RDONLY)
    fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_SIZE | abi.FATTR_FH, fh=rfh, size=1))
    assert (share / "f").read_bytes() == b"0"
    assert errno_of(fs.setattr, CTX, e.nodeid,
                    sreq(abi.FATTR_SIZE | abi.FATTR_FH, fh=9999, size=0)) == errno.EBADF
    assert errno_of(fs.setattr, CTX, ROOT, sreq(abi.FATTR_SIZE, size=0)) == errno.EISDIR
    assert errno_of(fs.setattr, CTX, e.nodeid, sreq(abi.FATTR_SIZE, size=-1)) == errno.EINVAL


def test_setattr_times(fs, share):
    (share / "f").write_bytes(b"x")
    e = fs.lookup(CTX, ROOT, b"f")
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_ATIME | abi.FATTR_MTIME,
                                           atime_ns=1_000_000_123, mtime_ns=2_500_000_000))
    assert st.st_atime_ns == 1_000_000_123 and st.st_mtime_ns == 2_500_000_000
    # Only mtime: atime untouched.
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_MTIME, mtime_ns=7_000_000_000))
    assert st.st_atime_ns == 1_000_000_123 and st.st_mtime_ns == 7_000_000_000
    before = time.time_ns()
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_MTIME | abi.FATTR_MTIME_NOW, mtime_now=True))
    assert st.st_mtime_ns >= before - 1_000_000_000   # "now", not the 7 s value
    assert st.st_atime_ns == 1_000_000_123
    host = os.stat(share / "f")
    assert host.st_mtime_ns == st.st_mtime_ns


def test_setattr_on_symlink(fs, share):
    os.symlink("target", share / "l")
    e = fs.lookup(CTX, ROOT, b"l")
    assert errno_of(fs.setattr, CTX, e.nodeid, sreq(abi.FATTR_MODE, mode=0o600)) == errno.EOPNOTSUPP
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_UID, uid=55))
    assert st.st_uid == 55 and os.lstat(share / "l").st_uid == 55
    st, _ = fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_MTIME, mtime_ns=3_000_000_000))
    assert os.lstat(share / "l").st_mtime_ns == 3_000_000_000


# ------------------------------------------------------------------ names


def test_symlink_and_readlink(fs, share):
    e = fs.symlink(CTX, ROOT, b"l", b"some/where")
    assert stat.S_ISLNK(e.attr.st_mode)
    assert os.readlink(share / "l") == "some/where"
    assert fs.readlink(CTX, e.nodeid) == b"some/where"
    assert errno_of(fs.readlink, CTX, ROOT) == errno.EINVAL
    assert errno_of(fs.symlink, CTX, ROOT, b"l", b"x") == errno.EEXIST
    assert errno_of(fs.symlink, CTX, ROOT, b"m", b"") == errno.ENOENT
    assert errno_of(fs.symlink, CTX, ROOT, b"m", b"a\0b") == errno.EINVAL


def test_mknod(fs, share):
    e = fs.mknod(CTX, ROOT, b"reg", stat.S_IFREG | 0o666, 0, 0o022)
    assert stat.S_ISREG(e.attr.st_mode) and stat.S_IMODE(e.attr.st_mode) == 0o644
    f = fs.mknod(CTX, ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, 0)
    assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode) and f.nodeid != e.nodeid
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        assert errno_of(fs.mknod, CTX, ROOT, b"dev", kind | 0o600, os.makedev(1, 3), 0) \
            == errno.EPERM
    assert not (share / "dev").exists()
    # The guest kernel handles FIFOs itself; opening one here could block the worker.
    assert errno_of(fs.open, CTX, f.nodeid, os.O_RDONLY) == errno.ENXIO


def test_mkdir_rmdir_unlink(fs, share):
    d = fs.mkdir(CTX, ROOT, b"d", 0o777, 0o027)
    assert stat.S_ISDIR(d.attr.st_mode) and stat.S_IMODE(d.attr.st_mode) == 0o750
    assert errno_of(fs.mkdir, CTX, ROOT, b"d", 0o777, 0) == errno.EEXIST
    (share / "d" / "f").write_bytes(b"x")
    assert errno_of(fs.rmdir, CTX, ROOT, b"d") == errno.ENOTEMPTY
    assert errno_of(fs.unlink, CTX, ROOT, b"d") == errno.EISDIR
    assert errno_of(fs.rmdir, CTX, d.nodeid, b"f") == errno.ENOTDIR
    fs.unlink(CTX, d.nodeid, b"f")
    assert not (share / "d" / "f").exists()
    assert errno_of(fs.unlink, CTX, d.nodeid, b"f") == errno.ENOENT
    fs.rmdir(CTX, ROOT, b"d")
    assert not (share / "d").exists()
    # The node id stays valid until forgotten, but the directory is gone.
    assert errno_of(fs.mkdir, CTX, d.nodeid, b"x", 0o755, 0) == errno.ENOENT


def test_new_entries_are_owned_by_the_caller(fs, share):
    c, fh, _ = fs.create(USER, ROOT, b"c", 0o640, os.O_WRONLY, 0)
    m = fs.mkdir(USER, ROOT, b"m", 0o755, 0)
    s = fs.symlink(USER, ROOT, b"s", b"c")
    n = fs.mknod(USER, ROOT, b"n", stat.S_IFREG | 0o600, 0, 0)
    for name, e in [("c", c), ("m", m), ("s", s), ("n", n)]:
        st = os.lstat(share / name)
        assert (st.st_uid, st.st_gid) == (1234, 2345), name
        assert (e.attr.st_uid, e.attr.st_gid) == (1234, 2345), name
    # The mode is the request's, under its umask only (never the VMM's).
    old_umask = os.umask(0o077)
    try:
        x, _, _ = fs.create(USER, ROOT, b"x", 0o1777, os.O_WRONLY, 0o002)
        d = fs.mkdir(USER, ROOT, b"d", 0o777, 0)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(share / "x").st_mode) == 0o1775 == stat.S_IMODE(x.attr.st_mode)
    assert stat.S_IMODE(os.stat(share / "d").st_mode) == 0o777 == stat.S_IMODE(d.attr.st_mode)
    # Existing files opened through CREATE keep their owner.
    (share / "old").write_bytes(b"x")
    fs.create(USER, ROOT, b"old", 0o644, os.O_RDONLY, 0)
    assert os.stat(share / "old").st_uid == 0


def test_setgid_directory_keeps_group(fs, share):
    (share / "g").mkdir()
    os.chown(share / "g", 0, 4444)
    os.chmod(share / "g", 0o2775)
    g = fs.lookup(CTX, ROOT, b"g")
    e = fs.mkdir(USER, g.nodeid, b"sub", 0o755, 0)
    assert (e.attr.st_uid, e.attr.st_gid) == (1234, 4444)


def test_rename_plain_and_flags(fs, share):
    (share / "a").write_bytes(b"A")
    (share / "b").write_bytes(b"B")
    (share / "d").mkdir()
    d = fs.lookup(CTX, ROOT, b"d")
    fs.rename(CTX, ROOT, b"a", d.nodeid, b"a2", 0)
    assert (share / "d" / "a2").read_bytes() == b"A" and not (share / "a").exists()
    assert errno_of(fs.rename, CTX, d.nodeid, b"a2", ROOT, b"b", abi.RENAME_NOREPLACE) \
        == errno.EEXIST
    fs.rename(CTX, d.nodeid, b"a2", ROOT, b"b", abi.RENAME_EXCHANGE)
    assert (share / "b").read_bytes() == b"A" and (share / "d" / "a2").read_bytes() == b"B"
    fs.rename(CTX, ROOT, b"b", ROOT, b"c", abi.RENAME_NOREPLACE)
    assert (share / "c").read_bytes() == b"A"
    assert errno_of(fs.rename, CTX, ROOT, b"c", ROOT, b"e", 1 << 7) == errno.EINVAL
    assert errno_of(fs.rename, CTX, ROOT, b"nope", ROOT, b"e", 0) == errno.ENOENT
    f = fs.lookup(CTX, ROOT, b"c")
    assert errno_of(fs.rename, CTX, f.nodeid, b"x", ROOT, b"e", 0) == errno.ENOTDIR


def test_link(fs, share):
    (share / "f").write_bytes(b"x")
    (share / "d").mkdir()
    f = fs.lookup(CTX, ROOT, b"f")
    d = fs.lookup(CTX, ROOT, b"d")
    e = fs.link(CTX, f.nodeid, d.nodeid, b"g")
    assert e.nodeid == f.nodeid and e.attr.st_nlink == 2
    assert os.stat(share / "d" / "g").st_ino == os.stat(share / "f").st_ino
    assert errno_of(fs.link, CTX, d.nodeid, ROOT, b"dlink") == errno.EPERM
    assert errno_of(fs.link, CTX, f.nodeid, ROOT, b"f") == errno.EEXIST
    assert errno_of(fs.link, CTX, f.nodeid, f.nodeid, b"x") == errno.ENOTDIR
    # Linking a symlink links the symlink itself.
    os.symlink("f", share / "l")
    lnk = fs.lookup(CTX, ROOT, b"l")
    e2 = fs.link(CTX, lnk.nodeid, ROOT, b"l2")
    assert os.path.islink(share / "l2") and e2.nodeid == lnk.nodeid


# ------------------------------------------------------------------ files


def test_open_read_write(fs, share):
    (share / "f").write_bytes(b"hello world")
    e = fs.lookup(CTX, ROOT, b"f")
    fh, _ = fs.open(CTX, e.nodeid, os.O_RDWR)
    assert read_all(fs, e.nodeid, fh) == b"hello world"
    assert read_all(fs, e.nodeid, fh, size=5, offset=6) == b"world"
    assert read_all(fs, e.nodeid, fh, size=100, offset=1000) == b""
    assert write(fs, e.nodeid, fh, b"WORLD!", 6) == 6
    assert (share / "f").read_bytes() == b"hello WORLD!"
    fs.flush(CTX, e.nodeid, fh, 0)
    fs.fsync(CTX, e.nodeid, fh, False)
    fs.fsync(CTX, e.nodeid, fh, True)
    fs.release(CTX, e.nodeid, fh, 0)
    assert errno_of(fs.read, CTX, e.nodeid, fh, BytesWriter(10), 10, 0) == errno.EBADF


def test_open_flags_and_types(fs, share):
    (share / "f").write_bytes(b"abc")
    e = fs.lookup(CTX, ROOT, b"f")
    rfh, _ = fs.open(CTX, e.nodeid, os.O_RDONLY)
    assert errno_of(write, fs, e.nodeid, rfh, b"x", 0) == errno.EBADF
    wfh, _ = fs.open(CTX, e.nodeid, os.O_WRONLY)
    assert errno_of(read_all, fs, e.nodeid, wfh) == errno.EBADF
    # O_CREAT/O_EXCL from the guest are ignored on OPEN; O_TRUNC is honoured.
    tfh, _ = fs.open(CTX, e.nodeid, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_EXCL)
    assert (share / "f").read_bytes() == b""
    assert errno_of(fs.open, CTX, ROOT, os.O_RDONLY) == errno.EISDIR
    assert errno_of(fs.open, CTX, e.nodeid, os.O_ACCMODE) == errno.EINVAL
    assert errno_of(fs.open, CTX, 777, os.O_RDONLY) == errno.EBADF
    # A handle belongs to one node: using it with another nodeid is EBADF.
    (share / "g").write_bytes(b"g")
    g = fs.lookup(CTX, ROOT, b"g")
    assert errno_of(fs.read, CTX, g.nodeid, rfh, BytesWriter(4), 4, 0) == errno.EBADF
    assert errno_of(fs.release, CTX, g.nodeid, rfh, 0) == errno.EBADF
    fs.release(CTX, e.nodeid, rfh, 0)
    assert errno_of(fs.release, CTX, e.nodeid, rfh, 0) == errno.EBADF


def test_append_without_and_with_writeback(share):
    (share / "f").write_bytes(b"0123")
    fs = make_fs(share)
    e = fs.lookup(CTX, ROOT, b"f")
    fh, _ = fs.open(CTX, e.nodeid, os.O_WRONLY | os.O_APPEND)
    write(fs, e.nodeid, fh, b"AB", 0)           # O_APPEND kept: lands at the end
    assert (share / "f").read_bytes() == b"0123AB"
    fs.destroy()
    wb = make_fs(share, writeback=True)
    e = wb.lookup(CTX, ROOT, b"f")
    fh, _ = wb.open(CTX, e.nodeid, os.O_WRONLY | os.O_APPEND)
    write(wb, e.nodeid, fh, b"xy", 0)           # writeback: the guest computes offsets
    assert (share / "f").read_bytes() == b"xy23AB"
    # ...and O_WRONLY became O_RDWR so the guest can fill partial pages.
    assert read_all(wb, e.nodeid, fh) == b"xy23AB"
    wb.destroy()


def test_create(fs, share):
    e, fh, _ = fs.create(CTX, ROOT, b"n", 0o666, os.O_RDWR, 0o022)
    assert stat.S_IMODE(os.stat(share / "n").st_mode) == 0o644
    assert write(fs, e.nodeid, fh, b"data", 0) == 4
    assert read_all(fs, e.nodeid, fh) == b"data"
    assert fs.lookup(CTX, ROOT, b"n").nodeid == e.nodeid
    assert errno_of(fs.create, CTX, ROOT, b"n", 0o644, os.O_RDWR | os.O_EXCL, 0) == errno.EEXIST
    # Without O_EXCL the existing file is opened, untouched unless O_TRUNC.
    e2, fh2, _ = fs.create(CTX, ROOT, b"n", 0o600, os.O_RDONLY, 0)
    assert e2.nodeid == e.nodeid and read_all(fs, e.nodeid, fh2) == b"data"
    assert stat.S_IMODE(os.stat(share / "n").st_mode) == 0o644
    fs.create(CTX, ROOT, b"n", 0o600, os.O_WRONLY | os.O_TRUNC, 0)
    assert (share / "n").read_bytes() == b""
    (share / "d").mkdir()
    assert errno_of(fs.create, CTX, ROOT, b"d", 0o644, os.O_RDONLY, 0) == errno.EISDIR
    os.mkfifo(share / "fifo")
    assert errno_of(fs.create, CTX, ROOT, b"fifo", 0o644, os.O_RDONLY, 0) == errno.ENXIO
    f = fs.lookup(CTX, ROOT, b"n")
    assert errno_of(fs.create, CTX, f.nodeid, b"x", 0o644, os.O_RDONLY, 0) == errno.ENOTDIR


def test_create_does_not_leak_fds_on_error(fs, share):
    (share / "d").mkdir()
    base = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            fs.create(CTX, ROOT, b"d", 0o644, os.O_RDONLY, 0)
    assert len(os.listdir("/proc/self/fd")) == base


def test_write_kill_suidgid(fs, share):
    (share / "f").write_bytes(b"x")
    os.chmod(share / "f", 0o6755)
    e = fs.lookup(CTX, ROOT, b"f")
    fh, _ = fs.open(CTX, e.nodeid, os.O_WRONLY)
    write(fs, e.nodeid, fh, b"y", 0)
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o6755
    write(fs, e.nodeid, fh, b"z", 0, abi.FUSE_WRITE_KILL_SUIDGID)
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o755


def test_fallocate_lseek_copy_file_range(fs, share):
    e, fh, _ = fs.create(CTX, ROOT, b"f", 0o644, os.O_RDWR, 0)
    fs.fallocate(CTX, e.nodeid, fh, 0, 0, 1 << 20)
    assert os.stat(share / "f").st_size == 1 << 20
    fs.fallocate(CTX, e.nodeid, fh, FALLOC_FL_KEEP_SIZE, 1 << 20, 4096)
    assert os.stat(share / "f").st_size == 1 << 20
    # Sparse file: data at 0 and at 1 MiB, hole in between.
    g, gfh, _ = fs.create(CTX, ROOT, b"g", 0o644, os.O_RDWR, 0)
    write(fs, g.nodeid, gfh, b"a" * 4096, 0)
    write(fs, g.nodeid, gfh, b"b" * 4096, 1 << 20)
    hole = fs.lseek(CTX, g.nodeid, gfh, 0, os.SEEK_HOLE)
    assert 4096 <= hole < 1 << 20
    assert fs.lseek(CTX, g.nodeid, gfh, hole, os.SEEK_DATA) == 1 << 20
    assert errno_of(fs.lseek, CTX, g.nodeid, gfh, (1 << 20) + 8192, os.SEEK_DATA) == errno.ENXIO
    assert errno_of(fs.lseek, CTX, g.nodeid, gfh, 0, 77) == errno.EINVAL
    fs.fallocate(CTX, g.nodeid, gfh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    assert (share / "g").read_bytes()[:4096] == b"\0" * 4096
    assert errno_of(fs.fallocate, CTX, g.nodeid, gfh, 0, 0, 0) == errno.EINVAL
    # copy_file_range between two handles.
    (share / "src").write_bytes(b"0123456789")
    s = fs.lookup(CTX, ROOT, b"src")
    sfh, _ = fs.open(CTX, s.nodeid, os.O_RDONLY)
    d, dfh, _ = fs.create(CTX, ROOT, b"dst", 0o644, os.O_WRONLY, 0)
    assert fs.copy_file_range(CTX, s.nodeid, sfh, 2, d.nodeid, dfh, 1, 5, 0) == 5
    assert (share / "dst").read_bytes() == b"\x0023456"
    assert errno_of(fs.copy_file_range, CTX, s.nodeid, sfh, 0, d.nodeid, dfh, 0, 1, 1) \
        == errno.EINVAL
    assert errno_of(fs.copy_file_range, CTX, s.nodeid, dfh, 0, d.nodeid, sfh, 0, 1, 0) \
        == errno.EBADF


# ------------------------------------------------------------------ directories


def test_readdir_offsets_are_stable(fs, share):
    names = {f"f{i:03d}".encode() for i in range(50)}
    for n in names:
        (share / n.decode()).write_bytes(b"")
    dh, _ = fs.opendir(CTX, ROOT, 0)
    first = []
    it = fs.readdir(CTX, ROOT, dh, 0)
    for _ in range(10):
        first.append(next(it))
    it.close()
    # The guest resumes at the last offset it got, possibly after the directory changed.
    (share / "late").write_bytes(b"")
    rest = list(fs.readdir(CTX, ROOT, dh, first[-1].offset))
    got = first + rest
    # Offsets are the host's cookies: each names the place after its entry, all distinct.
    assert len({x.offset for x in got}) == len(got) and all(x.offset > 0 for x in got)
    assert {x.name for x in got} - {b"late"} == names | {b".", b".."}
    assert len(got) - (b"late" in {x.name for x in got}) == len(names) + 2
    typ = {x.name: x.type for x in got}
    assert typ[b"."] == abi.DT_DIR and typ[b"f000"] == abi.DT_REG
    # The last offset is the end of the listing; any offset handed out resumes after its entry.
    assert list(fs.readdir(CTX, ROOT, dh, got[-1].offset)) == []
    again = list(fs.readdir(CTX, ROOT, dh, got[20].offset))
    assert [x.name for x in again] == [x.name for x in got[21:]]
    # Offset 0 again: a fresh listing that includes the new file.
    assert b"late" in {x.name for x in fs.readdir(CTX, ROOT, dh, 0)}
    fs.fsyncdir(CTX, ROOT, dh, False)
    fs.releasedir(CTX, ROOT, dh)
    assert errno_of(fs.readdir, CTX, ROOT, dh, 0) == errno.EBADF


def test_dir_and_file_handles_are_not_interchangeable(fs, share):
    (share / "f").write_bytes(b"x")
    e = fs.lookup(CTX, ROOT, b"f")
    assert errno_of(fs.opendir, CTX, e.nodeid, 0) == errno.ENOTDIR
    fh, _ = fs.open(CTX, e.nodeid, os.O_RDONLY)
    assert errno_of(fs.readdir, CTX, e.nodeid, fh, 0) == errno.ENOTDIR
    assert errno_of(fs.releasedir, CTX, e.nodeid, fh) == errno.ENOTDIR
    dh, _ = fs.opendir(CTX, ROOT, 0)
    assert errno_of(fs.read, CTX, ROOT, dh, BytesWriter(8), 8, 0) == errno.EISDIR
    assert errno_of(fs.release, CTX, ROOT, dh, 0) == errno.EISDIR


def test_readdirplus_looks_up_each_entry(fs, share):
    (share / "a").write_bytes(b"aa")
    (share / "sub").mkdir()
    os.symlink("a", share / "lnk")
    dh, _ = fs.opendir(CTX, ROOT, 0)
    n0 = fs.inode_count()
    got = {d.name: (d, e) for d, e in fs.readdirplus(CTX, ROOT, dh, 0)}
    assert set(got) == {b".", b"..", b"a", b"sub", b"lnk"}
    assert got[b"."][1].nodeid == 0 and got[b".."][1].nodeid == 0
    d, e = got[b"a"]
    assert e.nodeid != 0 and e.attr.st_size == 2 and d.type == abi.DT_REG
    assert d.ino == os.stat(share / "a").st_ino
    assert got[b"sub"][0].type == abi.DT_DIR and got[b"lnk"][0].type == abi.DT_LNK
    assert fs.inode_count() == n0 + 3
    assert fs.lookup(CTX, ROOT, b"a").nodeid == e.nodeid
    assert fs.lookup_count(e.nodeid) == 2
    # Entries removed after the snapshot are skipped, not errors.
    dh2, _ = fs.opendir(CTX, ROOT, 0)
    it = fs.readdirplus(CTX, ROOT, dh2, 0)
    first = next(it)
    os.unlink(share / "a")
    os.rmdir(share / "sub")
    os.unlink(share / "lnk")
    rest = [d.name for d, _ in it]
    assert b"a" not in rest and b"sub" not in rest and b"lnk" not in rest
    assert first is not None


def test_statfs_and_access(fs, share):
    sv = fs.statfs(CTX, ROOT)
    host = os.statvfs(share)
    assert sv.f_bsize == host.f_bsize and sv.f_blocks == host.f_blocks
    (share / "f").write_bytes(b"x")
    os.chmod(share / "f", 0o640)
    os.chown(share / "f", 1234, 2345)
    e = fs.lookup(CTX, ROOT, b"f")
    fs.access(CTX, e.nodeid, os.F_OK)
    fs.access(CTX, e.nodeid, os.R_OK | os.W_OK)
    assert errno_of(fs.access, CTX, e.nodeid, os.X_OK) == errno.EACCES   # root, no x bit
    fs.access(USER, e.nodeid, os.R_OK | os.W_OK)
    fs.access(Context(1, 2345, 3), e.nodeid, os.R_OK)
    assert errno_of(fs.access, Context(1, 2345, 3), e.nodeid, os.W_OK) == errno.EACCES
    assert errno_of(fs.access, Context(1, 1, 3), e.nodeid, os.R_OK) == errno.EACCES
    assert errno_of(fs.access, CTX, e.nodeid, 0x40) == errno.EINVAL


def test_xattrs(fs, share):
    (share / "f").write_bytes(b"x")
    e = fs.lookup(CTX, ROOT, b"f")
    fs.setxattr(CTX, e.nodeid, b"user.k", b"value", 0)
    assert os.getxattr(share / "f", "user.k") == b"value"
    assert fs.getxattr(CTX, e.nodeid, b"user.k", 0) == 5
    assert fs.getxattr(CTX, e.nodeid, b"user.k", 64) == b"value"
    assert errno_of(fs.getxattr, CTX, e.nodeid, b"user.k", 2) == errno.ERANGE
    assert errno_of(fs.getxattr, CTX, e.nodeid, b"user.none", 64) == errno.ENODATA
    assert errno_of(fs.setxattr, CTX, e.nodeid, b"user.k", b"v", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(fs.setxattr, CTX, e.nodeid, b"user.z", b"v", os.XATTR_REPLACE) \
        == errno.ENODATA
    fs.setxattr(CTX, e.nodeid, b"user.j", b"", 0)
    names = fs.listxattr(CTX, e.nodeid, 1024)
    assert set(names.split(b"\0")[:-1]) >= {b"user.k", b"user.j"} and names.endswith(b"\0")
    assert fs.listxattr(CTX, e.nodeid, 0) == len(names)
    assert errno_of(fs.listxattr, CTX, e.nodeid, 3) == errno.ERANGE
    fs.removexattr(CTX, e.nodeid, b"user.k")
    assert "user.k" not in os.listxattr(share / "f")
    assert errno_of(fs.removexattr, CTX, e.nodeid, b"user.k") == errno.ENODATA
    # Directories work too; on symlinks and special files the host answers as a local fs does
    # (user.* cannot be set there: EPERM; reading one: ENODATA, not ENOTSUP).
    fs.setxattr(CTX, ROOT, b"user.d", b"1", 0)
    assert os.getxattr(share, "user.d") == b"1"
    os.symlink("f", share / "l")
    os.mkfifo(share / "p")
    for special in (b"l", b"p"):
        n = fs.lookup(CTX, ROOT, special).nodeid
        assert errno_of(fs.setxattr, CTX, n, b"user.k", b"v", 0) == errno.EPERM
        assert errno_of(fs.getxattr, CTX, n, b"user.k", 10) == errno.ENODATA
        assert errno_of(fs.getxattr, CTX, n, b"security.capability", 10) == errno.ENODATA
        assert fs.listxattr(CTX, n, 10) == b"" and fs.listxattr(CTX, n, 0) == 0
    assert "user.k" not in os.listxattr(share / "f")
    assert errno_of(fs.setxattr, CTX, e.nodeid, b"user.big", b"x" * 70000, 0) == errno.E2BIG
    assert errno_of(fs.setxattr, CTX, e.nodeid, b"", b"x", 0) == errno.EINVAL
    assert errno_of(fs.setxattr, CTX, e.nodeid, b"user.x", b"x", 8) == errno.EINVAL


# ------------------------------------------------------------------ robustness


def test_only_oserror_escapes(fs, share):
    (share / "f").write_bytes(b"abc")
    e = fs.lookup(CTX, ROOT, b"f")
    fh, _ = fs.open(CTX, e.nodeid, os.O_RDWR)

    class BrokenWriter(BytesWriter):
        def write_from_fd(self, fd, size, offset):
            raise RuntimeError("transport bug")

    assert errno_of(fs.read, CTX, e.nodeid, fh, BrokenWriter(10), 10, 0) == errno.EIO
    assert errno_of(fs.lookup, CTX, ROOT, "f") == errno.EINVAL         # str, not bytes
    assert errno_of(fs.lookup, CTX, "1", b"f") == errno.EBADF
    assert errno_of(fs.read, CTX, e.nodeid, fh, BytesWriter(10), 10, -1) == errno.EINVAL
    assert errno_of(fs.read, CTX, e.nodeid, fh, BytesWriter(10), 10, 1 << 64) == errno.EINVAL
    assert errno_of(fs.write, CTX, e.nodeid, fh, BytesReader(b"x"), -5, 0, 0) == errno.EINVAL
    assert errno_of(fs.setattr, CTX, e.nodeid, sreq(abi.FATTR_MTIME, mtime_ns=1 << 70)) \
        == errno.EINVAL
    assert errno_of(fs.mkdir, CTX, ROOT, b"x", -1, 0) == errno.EINVAL
    assert errno_of(fs.getattr, CTX, None, None) == errno.EBADF


def test_short_reader_write_returns_what_it_moved(fs, share):
    (share / "f").write_bytes(b"")
    e = fs.lookup(CTX, ROOT, b"f")
    fh, _ = fs.open(CTX, e.nodeid, os.O_RDWR)
    # The request carries 3 bytes but claims 10: only what exists is written.
    assert fs.write(CTX, e.nodeid, fh, BytesReader(b"abc"), 10, 0, 0) == 3
    assert (share / "f").read_bytes() == b"abc"
