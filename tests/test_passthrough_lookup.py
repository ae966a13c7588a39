"""PassthroughFs: lookup/forget accounting, fd lifetime, negative entries, cache policy, init."""

import errno
import os
import pathlib
import shutil
import tempfile
import threading

import pytest

from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse import abi
from fuse.filesystem import Context, Entry
from tests.passthrough_support import errno_of, make_fs

CTX = Context(uid=0, gid=0, pid=1)
ROOT = 1


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ lookup / forget


def test_lookup_returns_host_attrs_and_shared_nodeid(share):
    (share / "f").write_bytes(b"hello")
    fs = make_fs(share)
    e1 = fs.lookup(CTX, ROOT, b"f")
    st = os.lstat(share / "f")
    assert e1.nodeid >= 2
    assert e1.attr.st_ino == st.st_ino and e1.attr.st_size == 5
    assert e1.generation == 0
    e2 = fs.lookup(CTX, ROOT, b"f")
    assert e2.nodeid == e1.nodeid
    assert fs.lookup_count(e1.nodeid) == 2


def test_forget_closes_fd_at_zero_and_ids_are_not_reused(share):
    (share / "f").write_bytes(b"x")
    fs = make_fs(share)
    base = nfds()
    e = fs.lookup(CTX, ROOT, b"f")
    assert nfds() == base + 1
    fs.lookup(CTX, ROOT, b"f")
    assert nfds() == base + 1          # second lookup reuses the inode's fd
    fs.forget(e.nodeid, 1)
    assert nfds() == base + 1 and fs.lookup_count(e.nodeid) == 1
    fs.getattr(CTX, e.nodeid, None)
    fs.forget(e.nodeid, 1)
    assert nfds() == base
    assert errno_of(fs.getattr, CTX, e.nodeid, None) == errno.EBADF
    e2 = fs.lookup(CTX, ROOT, b"f")
    assert e2.nodeid > e.nodeid         # monotonic, never reused


def test_forget_more_than_looked_up_saturates(share):
    (share / "f").write_bytes(b"x")
    fs = make_fs(share)
    base = nfds()
    e = fs.lookup(CTX, ROOT, b"f")
    fs.forget(e.nodeid, 1000)
    assert nfds() == base
    assert fs.lookup_count(e.nodeid) == 0


def test_batch_forget_and_unknown_ids(share):
    for n in "abc":
        (share / n).write_bytes(b"x")
    fs = make_fs(share)
    base = nfds()
    ids = [fs.lookup(CTX, ROOT, n.encode()).nodeid for n in "abc"]
    fs.lookup(CTX, ROOT, b"a")
    assert nfds() == base + 3
    fs.batch_forget([(ids[0], 1), (ids[1], 1), (ids[2], 1), (99999, 3), ("junk", 1)])
    assert nfds() == base + 1                      # a still has one lookup
    assert fs.lookup_count(ids[0]) == 1
    fs.forget(99999, 1)                            # unknown: ignored, no exception
    fs.forget(0, 1)


def test_forget_root_never_closes_it(share):
    fs = make_fs(share)
    fs.forget(ROOT, 10**6)
    st, _ = fs.getattr(CTX, ROOT, None)
    assert st.st_ino == os.stat(share).st_ino


def test_hard_links_share_a_nodeid(share):
    (share / "f").write_bytes(b"x")
    os.link(share / "f", share / "g")
    fs = make_fs(share)
    a = fs.lookup(CTX, ROOT, b"f")
    b = fs.lookup(CTX, ROOT, b"g")
    assert a.nodeid == b.nodeid
    assert fs.lookup_count(a.nodeid) == 2
    c = fs.link(CTX, a.nodeid, ROOT, b"h")
    assert c.nodeid == a.nodeid and c.attr.st_nlink == 3
    assert fs.lookup_count(a.nodeid) == 3


def test_lookup_below_subdirectories(share):
    (share / "d" / "e").mkdir(parents=True)
    (share / "d" / "e" / "f").write_bytes(b"deep")
    fs = make_fs(share)
    d = fs.lookup(CTX, ROOT, b"d")
    e = fs.lookup(CTX, d.nodeid, b"e")
    f = fs.lookup(CTX, e.nodeid, b"f")
    assert f.attr.st_size == 4
    assert errno_of(fs.lookup, CTX, f.nodeid, b"x") == errno.ENOTDIR
    assert errno_of(fs.lookup, CTX, 12345, b"x") == errno.EBADF


def test_parallel_lookups_and_forgets_balance(share):
    for i in range(8):
        (share / f"f{i}").write_bytes(b"x")
    fs = make_fs(share)
    base = nfds()
    errors = []

    def worker(k):
        try:
            for _ in range(200):
                e = fs.lookup(CTX, ROOT, f"f{k % 8}".encode())
                fs.getattr(CTX, e.nodeid, None)
                fs.forget(e.nodeid, 1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert nfds() == base
    assert fs.inode_count() == 1


# ------------------------------------------------------------------ negative entries


def test_negative_timeout_zero_gives_enoent(share):
    fs = make_fs(share, negative_timeout=0)
    assert errno_of(fs.lookup, CTX, ROOT, b"missing") == errno.ENOENT


def test_negative_timeout_gives_nodeid_zero(share):
    fs = make_fs(share, negative_timeout=5, timeout=2)
    n = fs.inode_count()
    e = fs.lookup(CTX, ROOT, b"a.txt")
    assert e == Entry.negative(5.0)
    assert e.nodeid == 0 and e.entry_timeout == 5.0 and e.attr_timeout == 0.0 and e.attr is None
    assert fs.inode_count() == n                   # nothing created, nothing to forget
    # Like crosvm's lookup_negative_cache: create -> real inode, unlink -> negative again.
    entry, fh, _ = fs.create(CTX, ROOT, b"a.txt", 0o644, os.O_RDWR, 0o022)
    fs.release(CTX, entry.nodeid, fh, 0)
    e2 = fs.lookup(CTX, ROOT, b"a.txt")
    assert e2.nodeid == entry.nodeid != 0 and e2.entry_timeout == 2.0
    fs.unlink(CTX, ROOT, b"a.txt")
    assert fs.lookup(CTX, ROOT, b"a.txt").nodeid == 0


def test_negative_timeout_under_cache_never_is_kept(share):
    fs = make_fs(share, negative_timeout=5, cache="never")
    assert fs.lookup(CTX, ROOT, b"nope").entry_timeout == 5.0


def test_negative_timeout_other_errors_stay_errors(share):
    (share / "file").write_bytes(b"x")
    fs = make_fs(share, negative_timeout=5)
    f = fs.lookup(CTX, ROOT, b"file")
    assert errno_of(fs.lookup, CTX, f.nodeid, b"x") == errno.ENOTDIR
    assert errno_of(fs.lookup, CTX, ROOT, b"x" * 256) == errno.ENAMETOOLONG
    assert errno_of(fs.lookup, CTX, ROOT, b"..") == errno.EINVAL
    assert errno_of(fs.lookup, CTX, ROOT, b"a/b") == errno.EINVAL
    assert errno_of(fs.lookup, CTX, 4242, b"x") == errno.EBADF


def test_negative_timeout_eacces_stays_error():
    """EACCES needs an unprivileged caller: run the server in a child that dropped root.

    The share lives directly under /tmp so that the unprivileged child can reach it."""
    share = pathlib.Path(tempfile.mkdtemp(prefix="pyvmm-eacces-"))
    try:
        os.chmod(share, 0o755)
        (share / "locked").mkdir(mode=0o700)
        pid = os.fork()
        if pid == 0:  # child
            code = 99
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                fs = make_fs(share, negative_timeout=5)
                d = fs.lookup(CTX, ROOT, b"locked")
                try:
                    fs.lookup(CTX, d.nodeid, b"x")
                    code = 1
                except OSError as e:
                    code = 0 if e.errno == errno.EACCES else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(share)


# ------------------------------------------------------------------ cache policy


@pytest.mark.parametrize("cache,file_flags,dir_flags,timeout", [
    ("never", abi.FOPEN_DIRECT_IO, 0, 0.0),
    ("auto", 0, 0, 3.0),
    ("always", abi.FOPEN_KEEP_CACHE, abi.FOPEN_CACHE_DIR, 3.0),
])
def test_cache_policy(share, cache, file_flags, dir_flags, timeout):
    (share / "f").write_bytes(b"x")
    (share / "d").mkdir()
    fs = make_fs(share, cache=cache, timeout=3)
    e = fs.lookup(CTX, ROOT, b"f")
    assert e.entry_timeout == timeout and e.attr_timeout == timeout
    assert fs.getattr(CTX, e.nodeid, None)[1] == timeout
    fh, flags = fs.open(CTX, e.nodeid, os.O_RDONLY)
    assert flags == file_flags
    fs.release(CTX, e.nodeid, fh, 0)
    d = fs.lookup(CTX, ROOT, b"d")
    dh, dflags = fs.opendir(CTX, d.nodeid, 0)
    assert dflags == dir_flags
    fs.releasedir(CTX, d.nodeid, dh)
    ce, cfh, cflags = fs.create(CTX, ROOT, b"new", 0o644, os.O_WRONLY, 0)
    assert cflags == file_flags and ce.entry_timeout == timeout
    m = fs.mkdir(CTX, ROOT, b"sub", 0o755, 0)
    assert m.entry_timeout == timeout and m.attr_timeout == timeout


# ------------------------------------------------------------------ init / destroy


def test_init_reports_what_it_supports(share):
    """init() states what the passthrough supports; masking with what the guest offers is the
    session's job (test_passthrough_wire.py checks the negotiated result)."""
    fs = PassthroughFs(FsOptions(source=str(share), tag="t"))
    want = fs.init(0xFFFFFFFF).flags
    assert want & abi.FUSE_DO_READDIRPLUS and want & abi.FUSE_READDIRPLUS_AUTO
    assert not want & abi.FUSE_WRITEBACK_CACHE
    assert not want & abi.FUSE_EXPORT_SUPPORT     # it refuses LOOKUP of '.' and '..'
    assert fs.init(0).flags == want               # what it supports does not depend on the guest
    wb = PassthroughFs(FsOptions(source=str(share), tag="t", writeback=True))
    assert wb.init(0xFFFFFFFF).flags & abi.FUSE_WRITEBACK_CACHE


def test_init_resets_and_destroy_closes_everything(share):
    (share / "f").write_bytes(b"x")
    (share / "d").mkdir()
    base = nfds()
    fs = make_fs(share)
    e = fs.lookup(CTX, ROOT, b"f")
    fh, _ = fs.open(CTX, e.nodeid, os.O_RDONLY)
    d = fs.lookup(CTX, ROOT, b"d")
    dh, _ = fs.opendir(CTX, d.nodeid, 0)
    assert nfds() == base + 5        # root + 2 inodes + 2 handles
    fs.destroy()                     # the session ends (the server's DESTROY, re-INIT, reset)
    fs.init(0xFFFFFFFF)              # and a new one starts from scratch
    assert nfds() == base + 1
    assert errno_of(fs.getattr, CTX, e.nodeid, None) == errno.EBADF
    e = fs.lookup(CTX, ROOT, b"f")
    fs.open(CTX, e.nodeid, os.O_RDONLY)
    fs.destroy()
    assert nfds() == base
    assert errno_of(fs.lookup, CTX, ROOT, b"f") == errno.EBADF
    fs.init(0)
    assert fs.lookup(CTX, ROOT, b"f").attr.st_size == 1


def test_pinned_fd_survives_concurrent_forget(share):
    """A FORGET while a request still uses the inode closes its fd only afterwards."""
    (share / "f").write_bytes(b"x")
    fs = make_fs(share)
    base = nfds()
    e = fs.lookup(CTX, ROOT, b"f")
    with fs._inodes.pin(e.nodeid) as inode:
        fd = inode.fd
        fs.forget(e.nodeid, 1)
        assert os.fstat(fd).st_ino == e.attr.st_ino   # still open and still the same file
        assert nfds() == base + 1
    assert nfds() == base
