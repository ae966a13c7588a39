"""PassthroughFs confinement: nothing a guest sends may touch anything outside the share.

Layout per test: ``tmp/share`` is served, ``tmp/outside`` is a sibling with a secret file and a
directory. Each test ends with ``world.check()``, which compares a fingerprint of ``tmp`` (top
level names) and of everything under ``outside`` (type, size, content, mode, owner, times,
link count, xattrs) with the one taken before the test. Outside files start with atime <
mtime, so under relatime a read by the server would show up as a changed atime too.
"""

import errno
import hashlib
import os
import stat
import threading

import pytest

from devices.virtio.fs import syscalls
from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse import abi
from fuse.filesystem import Context, SetattrRequest
from fuse.io import BytesReader, BytesWriter
from tests.passthrough_support import errno_of

CTX = Context(uid=0, gid=0, pid=1)
ROOT = 1
SECRET = b"TOP SECRET host data\n"


def sreq(valid, **kw):
    base = dict(fh=None, size=0, mode=0, uid=0, gid=0, atime_ns=0, mtime_ns=0,
                atime_now=False, mtime_now=False)
    base.update(kw)
    return SetattrRequest(valid=valid, **base)


def _read_noatime(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


class World:
    def __init__(self, tmp):
        self.tmp = tmp
        self.share = tmp / "share"
        self.outside = tmp / "outside"
        self.share.mkdir()
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(SECRET)
        (self.outside / "dir").mkdir()
        (self.outside / "dir" / "inner").write_bytes(b"inner")
        os.setxattr(self.outside / "secret", "user.tag", b"orig")
        # atime older than mtime: under relatime any read of these files updates atime, so
        # the fingerprint also detects reads (it reads them itself with O_NOATIME).
        for f in (self.outside / "secret", self.outside / "dir" / "inner"):
            os.utime(f, ns=(1_000_000_000, os.stat(f).st_mtime_ns))
        self.before = self.fingerprint()

    def fingerprint(self):
        out = {"top": sorted(os.listdir(self.tmp))}
        for dirpath, dirnames, filenames in os.walk(self.outside):
            for name in sorted(dirnames + filenames) + ["."]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                rec = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_uid,
                       st.st_gid, st.st_nlink, st.st_mtime_ns, st.st_atime_ns,
                       sorted(os.listxattr(p, follow_symlinks=False)))
                if stat.S_ISREG(st.st_mode):
                    rec += (hashlib.sha256(_read_noatime(p)).hexdigest(),
                            os.getxattr(p, "user.tag") if "user.tag" in rec[-1] else None)
                if stat.S_ISDIR(st.st_mode):
                    rec += (sorted(os.listdir(p)),)
                out[os.path.relpath(p, self.tmp)] = rec
        return out

    def check(self):
        assert self.fingerprint() == self.before


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


@pytest.fixture
def fs(world):
    f = PassthroughFs(FsOptions(source=str(world.share), tag="t"))
    f.init(0xFFFFFFFF)
    yield f
    f.destroy()


def read_handle(fs, nodeid, fh):
    w = BytesWriter(4096)
    fs.read(CTX, nodeid, fh, w, 4096, 0)
    return w.data


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name,err", [
    (b"..", errno.EINVAL), (b".", errno.EINVAL), (b"", errno.EINVAL),
    (b"../outside", errno.EINVAL), (b"../outside/secret", errno.EINVAL), (b"/etc", errno.EINVAL),
    (b"a/b", errno.EINVAL), (b"x\0y", errno.EINVAL), (b"/", errno.EINVAL),
])
def test_bad_names_refused_everywhere(world, fs, name, err):
    (world.share / "f").write_bytes(b"f")
    (world.share / "d").mkdir()
    f = fs.lookup(CTX, ROOT, b"f")
    d = fs.lookup(CTX, ROOT, b"d")
    for parent in (ROOT, d.nodeid):
        assert errno_of(fs.lookup, CTX, parent, name) == err
        assert errno_of(fs.mkdir, CTX, parent, name, 0o755, 0) == err
        assert errno_of(fs.mknod, CTX, parent, name, stat.S_IFREG | 0o644, 0, 0) == err
        assert errno_of(fs.symlink, CTX, parent, name, b"target") == err
        assert errno_of(fs.create, CTX, parent, name, 0o644, os.O_RDWR, 0) == err
        assert errno_of(fs.unlink, CTX, parent, name) == err
        assert errno_of(fs.rmdir, CTX, parent, name) == err
        assert errno_of(fs.link, CTX, f.nodeid, parent, name) == err
        assert errno_of(fs.rename, CTX, ROOT, b"f", parent, name, 0) == err
        assert errno_of(fs.rename, CTX, parent, name, ROOT, b"g", 0) == err
        assert errno_of(fs.rename, CTX, ROOT, b"d", parent, name, abi.RENAME_EXCHANGE) == err
    assert sorted(os.listdir(world.share)) == ["d", "f"]
    world.check()


def test_dotdot_at_root_with_negative_cache_is_not_cached_or_followed(world):
    fs = PassthroughFs(FsOptions(source=str(world.share), tag="t", negative_timeout=5))
    assert errno_of(fs.lookup, CTX, ROOT, b"..") == errno.EINVAL
    assert errno_of(fs.lookup, CTX, ROOT, b"../outside/secret") == errno.EINVAL
    world.check()


def test_unknown_nodeids_and_handles(world, fs):
    # The guest cannot guess its way to host inodes: only handed-out ids work.
    for nid in (0, 2, 3, 100, 2**63, -1):
        assert errno_of(fs.getattr, CTX, nid, None) == errno.EBADF
        assert errno_of(fs.open, CTX, nid, os.O_RDONLY) == errno.EBADF
        assert errno_of(fs.link, CTX, nid, ROOT, b"x") == errno.EBADF
        assert errno_of(fs.readlink, CTX, nid) == errno.EBADF
    assert errno_of(fs.read, CTX, ROOT, 1, BytesWriter(8), 8, 0) == errno.EBADF
    assert os.listdir(world.share) == []
    world.check()


# ------------------------------------------------------------------ symlinks pointing out


@pytest.mark.parametrize("target", ["ABS", "../outside/secret"])
def test_symlink_to_outside_file_is_never_followed(world, fs, target):
    tgt = str(world.outside / "secret") if target == "ABS" else target
    os.symlink(tgt, world.share / "esc")
    e = fs.lookup(CTX, ROOT, b"esc")
    assert stat.S_ISLNK(e.attr.st_mode)
    assert e.attr.st_ino == os.lstat(world.share / "esc").st_ino
    assert e.attr.st_ino != os.stat(world.outside / "secret").st_ino
    assert fs.readlink(CTX, e.nodeid) == tgt.encode()          # the text, nothing more
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_APPEND):
        assert errno_of(fs.open, CTX, e.nodeid, flags) == errno.ELOOP
    assert errno_of(fs.opendir, CTX, e.nodeid, 0) == errno.ENOTDIR
    assert errno_of(fs.lookup, CTX, e.nodeid, b"secret") == errno.ENOTDIR
    assert errno_of(fs.setattr, CTX, e.nodeid, sreq(abi.FATTR_SIZE, size=0)) == errno.EINVAL
    assert errno_of(fs.setattr, CTX, e.nodeid, sreq(abi.FATTR_MODE, mode=0o777)) \
        == errno.EOPNOTSUPP
    # chown/utimes change the link itself only.
    fs.setattr(CTX, e.nodeid, sreq(abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_MTIME | abi.FATTR_ATIME,
                                   uid=4321, gid=4321, mtime_ns=5, atime_ns=5))
    assert os.lstat(world.share / "esc").st_uid == 4321
    assert errno_of(fs.setxattr, CTX, e.nodeid, b"user.tag", b"evil", 0) == errno.EPERM
    assert errno_of(fs.removexattr, CTX, e.nodeid, b"user.tag") == errno.EPERM
    # xattr reads reach the link itself (ENODATA, as a local fs says), never the target's "orig",
    # and a name the host allows on links lands on the link.
    assert errno_of(fs.getxattr, CTX, e.nodeid, b"user.tag", 100) == errno.ENODATA
    assert fs.listxattr(CTX, e.nodeid, 100) == b""
    raw = PassthroughFs(FsOptions(source=str(world.share), tag="t", xattr_policy="passthrough"))
    raw.init(0xFFFFFFFF)
    r = raw.lookup(CTX, ROOT, b"esc")
    raw.setxattr(CTX, r.nodeid, b"trusted.tag", b"on-the-link", 0)
    assert os.getxattr(world.share / "esc", "trusted.tag", follow_symlinks=False) == b"on-the-link"
    assert raw.getxattr(CTX, r.nodeid, b"trusted.tag", 100) == b"on-the-link"
    raw.removexattr(CTX, r.nodeid, b"trusted.tag")
    raw.destroy()
    # A hard link of the symlink node links the symlink, not the outside file.
    h = fs.link(CTX, e.nodeid, ROOT, b"hard")
    assert h.nodeid == e.nodeid and os.path.islink(world.share / "hard")
    # CREATE through the symlink's name must not open or truncate the target.
    assert errno_of(fs.create, CTX, ROOT, b"esc", 0o644, os.O_WRONLY | os.O_TRUNC, 0) \
        == errno.ELOOP
    assert errno_of(fs.create, CTX, ROOT, b"esc", 0o644, os.O_RDWR | os.O_EXCL, 0) \
        == errno.EEXIST
    # readdirplus reports the link as a link.
    dh, _ = fs.opendir(CTX, ROOT, 0)
    got = {d.name: (d, en) for d, en in fs.readdirplus(CTX, ROOT, dh, 0)}
    assert got[b"esc"][0].type == abi.DT_LNK and stat.S_ISLNK(got[b"esc"][1].attr.st_mode)
    world.check()


def test_dangling_symlink_to_outside_is_not_created_through(world, fs):
    os.symlink(str(world.outside / "newfile"), world.share / "dang")
    os.symlink("../outside/newdir", world.share / "dang2")
    for flags in (os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_EXCL):
        with pytest.raises(OSError) as ei:
            fs.create(CTX, ROOT, b"dang", 0o644, flags, 0)
        assert ei.value.errno in (errno.ELOOP, errno.EEXIST)
    assert errno_of(fs.mkdir, CTX, ROOT, b"dang2", 0o755, 0) == errno.EEXIST
    assert errno_of(fs.mknod, CTX, ROOT, b"dang", stat.S_IFREG | 0o644, 0, 0) == errno.EEXIST
    assert not (world.outside / "newfile").exists()
    assert not (world.outside / "newdir").exists()
    world.check()


def test_symlink_to_outside_directory_is_not_a_directory(world, fs):
    os.symlink(str(world.outside / "dir"), world.share / "dl")
    os.symlink("../outside", world.share / "up")
    for name in (b"dl", b"up"):
        e = fs.lookup(CTX, ROOT, name)
        assert stat.S_ISLNK(e.attr.st_mode)
        for child in (b"inner", b"secret", b"dir"):
            assert errno_of(fs.lookup, CTX, e.nodeid, child) == errno.ENOTDIR
        assert errno_of(fs.mkdir, CTX, e.nodeid, b"new", 0o755, 0) == errno.ENOTDIR
        assert errno_of(fs.create, CTX, e.nodeid, b"new", 0o644, os.O_RDWR, 0) == errno.ENOTDIR
        assert errno_of(fs.symlink, CTX, e.nodeid, b"new", b"x") == errno.ENOTDIR
        assert errno_of(fs.unlink, CTX, e.nodeid, b"inner") == errno.ENOTDIR
        assert errno_of(fs.rename, CTX, e.nodeid, b"inner", ROOT, b"stolen", 0) == errno.ENOTDIR
        assert errno_of(fs.rename, CTX, ROOT, b"dl", e.nodeid, b"x", 0) == errno.ENOTDIR
        assert errno_of(fs.opendir, CTX, e.nodeid, 0) == errno.ENOTDIR
    assert not (world.share / "stolen").exists()
    world.check()


def test_guest_made_symlinks_are_only_text(world, fs):
    e = fs.symlink(CTX, ROOT, b"s", str(world.outside / "secret").encode())
    t = fs.symlink(CTX, ROOT, b"t", b"../outside/dir")
    assert errno_of(fs.open, CTX, e.nodeid, os.O_RDWR | os.O_TRUNC) == errno.ELOOP
    assert errno_of(fs.lookup, CTX, t.nodeid, b"inner") == errno.ENOTDIR
    assert errno_of(fs.setattr, CTX, e.nodeid, sreq(abi.FATTR_SIZE, size=0)) == errno.EINVAL
    assert errno_of(fs.link, CTX, t.nodeid, ROOT, b"../x") == errno.EINVAL
    world.check()


# ------------------------------------------------------------------ races


def test_directory_swapped_for_symlink_between_lookups(world, fs):
    (world.share / "d").mkdir()
    (world.share / "d" / "own").write_bytes(b"own")
    d = fs.lookup(CTX, ROOT, b"d")
    # The host (or a second guest path) replaces d with a symlink to the outside.
    os.rename(world.share / "d", world.share / "d_old")
    os.symlink(str(world.outside / "dir"), world.share / "d")
    # The old node id still means the original directory (its fd), never the new link.
    assert errno_of(fs.lookup, CTX, d.nodeid, b"inner") == errno.ENOENT
    own = fs.lookup(CTX, d.nodeid, b"own")
    assert own.attr.st_size == 3
    c, fh, _ = fs.create(CTX, d.nodeid, b"made", 0o644, os.O_RDWR, 0)
    fs.write(CTX, c.nodeid, fh, BytesReader(b"mine"), 4, 0, 0)
    assert (world.share / "d_old" / "made").read_bytes() == b"mine"
    dh, _ = fs.opendir(CTX, d.nodeid, 0)
    assert {x.name for x in fs.readdir(CTX, d.nodeid, dh, 0)} == {b".", b"..", b"own", b"made"}
    # A fresh lookup of the name gets the symlink, which leads nowhere.
    new = fs.lookup(CTX, ROOT, b"d")
    assert new.nodeid != d.nodeid and stat.S_ISLNK(new.attr.st_mode)
    assert errno_of(fs.lookup, CTX, new.nodeid, b"inner") == errno.ENOTDIR
    world.check()


def test_concurrent_swap_race_never_reaches_outside(world, fs):
    """A host thread keeps atomically exchanging share/d between a real directory and a
    symlink to outside/ while the server looks up d/secret, opens and reads it."""
    real = world.share / "d"
    real.mkdir()
    (real / "secret").write_bytes(b"inside copy\n")
    os.symlink(str(world.outside), world.share / "swap")
    stop = threading.Event()
    swaps = [0]

    def swapper():
        while not stop.is_set():
            syscalls.renameat2(-100, str(world.share / "d").encode(), -100,
                               str(world.share / "swap").encode(), abi.RENAME_EXCHANGE)
            swaps[0] += 1

    t = threading.Thread(target=swapper)
    t.start()
    reads = links = 0
    try:
        for _ in range(3000):
            try:
                d = fs.lookup(CTX, ROOT, b"d")
            except OSError:
                continue
            try:
                if stat.S_ISLNK(d.attr.st_mode):
                    links += 1
                    with pytest.raises(OSError) as ei:
                        fs.lookup(CTX, d.nodeid, b"secret")
                    assert ei.value.errno == errno.ENOTDIR
                    continue
                try:
                    s = fs.lookup(CTX, d.nodeid, b"secret")
                except OSError as e:
                    assert e.errno == errno.ENOENT
                    continue
                fh, _ = fs.open(CTX, s.nodeid, os.O_RDONLY)
                data = read_handle(fs, s.nodeid, fh)
                assert data == b"inside copy\n", data
                reads += 1
                fs.release(CTX, s.nodeid, fh, 0)
                fs.forget(s.nodeid, 1)
            finally:
                fs.forget(d.nodeid, 1)
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 0 and reads > 0
    assert fs.inode_count() == 1
    world.check()


# ------------------------------------------------------------------ links and renames


def test_hard_link_cannot_reach_outside(world, fs):
    (world.share / "f").write_bytes(b"f")
    os.symlink(str(world.outside / "secret"), world.share / "esc")
    esc = fs.lookup(CTX, ROOT, b"esc")
    f = fs.lookup(CTX, ROOT, b"f")
    fs.link(CTX, esc.nodeid, ROOT, b"esc_hard")
    assert os.path.islink(world.share / "esc_hard")
    assert os.stat(world.outside / "secret").st_nlink == 1
    for bad in (b"../outside/hl", b"../hl", b"..", str(world.outside / "hl").encode()):
        with pytest.raises(OSError):
            fs.link(CTX, f.nodeid, ROOT, bad)
    assert not (world.outside / "hl").exists() and not (world.tmp / "hl").exists()
    world.check()


def test_rename_cannot_move_out_or_in(world, fs):
    (world.share / "f").write_bytes(b"f")
    (world.share / "d").mkdir()
    d = fs.lookup(CTX, ROOT, b"d")
    for bad in (b"../outside/f", b"../f", b"..", str(world.outside / "f").encode(), b"d/../../f"):
        for flags in (0, abi.RENAME_NOREPLACE, abi.RENAME_EXCHANGE):
            with pytest.raises(OSError):
                fs.rename(CTX, ROOT, b"f", d.nodeid, bad, flags)
            with pytest.raises(OSError):
                fs.rename(CTX, d.nodeid, bad, ROOT, b"pulled", flags)
    assert (world.share / "f").read_bytes() == b"f"
    assert not (world.share / "pulled").exists()
    # Renaming a symlink to outside moves the link, not its target.
    os.symlink(str(world.outside / "secret"), world.share / "esc")
    fs.rename(CTX, ROOT, b"esc", d.nodeid, b"esc2", abi.RENAME_NOREPLACE)
    assert os.path.islink(world.share / "d" / "esc2")
    fs.unlink(CTX, d.nodeid, b"esc2")
    world.check()


def test_unlink_of_symlink_removes_link_only(world, fs):
    os.symlink(str(world.outside / "secret"), world.share / "esc")
    os.symlink(str(world.outside / "dir"), world.share / "escd")
    fs.unlink(CTX, ROOT, b"esc")
    assert errno_of(fs.rmdir, CTX, ROOT, b"escd") == errno.ENOTDIR
    fs.unlink(CTX, ROOT, b"escd")
    assert os.listdir(world.share) == []
    world.check()


def test_mounted_share_root_parent_not_listed(world, fs):
    dh, _ = fs.opendir(CTX, ROOT, 0)
    (world.share / "x").write_bytes(b"")
    names = {e.name for e in fs.readdir(CTX, ROOT, dh, 0)}
    assert names == {b".", b"..", b"x"}
    plus = list(fs.readdirplus(CTX, ROOT, dh, 0))
    dotdot = [en for de, en in plus if de.name == b".."]
    assert dotdot and dotdot[0].nodeid == 0           # never a node for the host parent
    world.check()
