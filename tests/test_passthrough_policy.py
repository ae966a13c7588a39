"""A hostile guest against the host-safety policies, through the real FUSE server (issue 11).

Requests are built on the wire as a guest kernel would send them, with the caller's uid/gid in
the header (a guest process of uid 1000, or guest root), and the host files are inspected
afterwards.  Under the default options no set-id file, device node, file capability or trusted
xattr may appear on the host; with the options that restore POSIX each of them can.  Ownership
and modes of new entries must be exactly the guest's, whatever the VMM's own umask.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import struct

import pytest

from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse import abi
from fuse.abi import Opcode
from fuse.io import BytesReader, BytesWriter
from fuse.logthrottle import FULL_WARNINGS
from fuse.server import Server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root (creates as other uids)")

HDR = abi.OUT_HEADER.size
ALL_FLAGS = (1 << 64) - 1
SETID = stat.S_ISUID | stat.S_ISGID
#: A well-formed VFS_CAP_REVISION_2 value (magic, then permitted/inheritable words): what
#: `setcap cap_net_raw+ep` writes.  The host kernel checks the format of a real one.
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
#: A POSIX ACL xattr (version 2, USER_OBJ rwx, GROUP_OBJ r-x, OTHER r-x).
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                      for tag, perm in ((1, 7), (4, 5), (0x20, 5)))
PROTECTED = {b"security.capability": CAPABILITY, b"security.selinux": b"system_u:object_r:x:s0",
             b"security.ima": b"\x03\x02forged", b"trusted.overlay.opaque": b"y",
             b"system.posix_acl_access": ACL}


def new_encode_dev(major: int, minor: int) -> int:
    """include/linux/kdev_t.h: what a guest kernel puts in fuse_mknod_in.rdev."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


class Guest:
    """A guest kernel's FUSE client, reduced to building requests and reading replies."""

    def __init__(self, share, uid: int = 1000, gid: int = 1000, **options) -> None:
        self.share = share
        self.fs = self.make_fs(FsOptions(source=str(share), tag="t", **options))
        self.server = Server(self.fs)
        self.uid, self.gid = uid, gid
        self.unique = 0
        err, body = self.call(Opcode.INIT, abi.INIT_IN.pack(
            major=7, minor=37, max_readahead=1 << 17, flags=ALL_FLAGS & 0xFFFFFFFF,
            flags2=ALL_FLAGS >> 32), nodeid=0)
        assert err == 0
        init = abi.INIT_OUT.unpack(body)
        self.flags = init.flags | init.flags2 << 32

    def make_fs(self, options: FsOptions):
        """The file system under test: the bare passthrough (subclasses put a device's in front)."""
        return PassthroughFs(options)

    def call(self, opcode: int, body: bytes = b"", nodeid: int = 1, *, uid: int | None = None,
             gid: int | None = None) -> tuple[int, bytes]:
        self.unique += 1
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(body), opcode=int(opcode),
                                 unique=self.unique, nodeid=nodeid,
                                 uid=self.uid if uid is None else uid,
                                 gid=self.gid if gid is None else gid, pid=4242)
        w = BytesWriter(1 << 17)
        n = self.server.handle(BytesReader(hdr + body), w)
        out = abi.OUT_HEADER.unpack(w.data[:n])
        assert out.len == n and out.unique == self.unique
        return -out.error, bytes(w.data[HDR:n])

    def ok(self, opcode: int, body: bytes = b"", nodeid: int = 1, **kw) -> bytes:
        err, data = self.call(opcode, body, nodeid, **kw)
        assert err == 0, f"{Opcode(opcode).name}: {errno.errorcode.get(err, err)}"
        return data

    # -- requests ------------------------------------------------------------------------------
    def create(self, name: bytes, mode: int, umask: int = 0, flags: int = os.O_RDWR,
               open_flags: int = 0, parent: int = 1, **kw) -> tuple[int, int, object]:
        err, body = self.call(Opcode.CREATE, abi.CREATE_IN.pack(
            flags=flags | os.O_CREAT, mode=stat.S_IFREG | mode, umask=umask,
            open_flags=open_flags) + name + b"\0", parent, **kw)
        if err:
            return err, 0, None
        e = abi.ENTRY_OUT.unpack(body)
        return 0, abi.OPEN_OUT.unpack(body, abi.ENTRY_OUT.size).fh, e

    def mknod(self, name: bytes, mode: int, rdev: int = 0, umask: int = 0, parent: int = 1,
              **kw) -> tuple[int, object]:
        err, body = self.call(Opcode.MKNOD, abi.MKNOD_IN.pack(mode=mode, rdev=rdev, umask=umask)
                              + name + b"\0", parent, **kw)
        return err, (abi.ENTRY_OUT.unpack(body) if not err else None)

    def mkdir(self, name: bytes, mode: int, umask: int = 0, parent: int = 1,
              **kw) -> tuple[int, object]:
        err, body = self.call(Opcode.MKDIR, abi.MKDIR_IN.pack(mode=stat.S_IFDIR | mode,
                                                             umask=umask) + name + b"\0",
                              parent, **kw)
        return err, (abi.ENTRY_OUT.unpack(body) if not err else None)

    def symlink(self, name: bytes, target: bytes, parent: int = 1, **kw) -> tuple[int, object]:
        err, body = self.call(Opcode.SYMLINK, name + b"\0" + target + b"\0", parent, **kw)
        return err, (abi.ENTRY_OUT.unpack(body) if not err else None)

    def lookup(self, name: bytes, parent: int = 1) -> int:
        return abi.ENTRY_OUT.unpack(self.ok(Opcode.LOOKUP, name + b"\0", parent)).nodeid

    def setattr(self, nodeid: int, **fields) -> tuple[int, object]:
        err, body = self.call(Opcode.SETATTR, abi.SETATTR_IN.pack(**fields), nodeid)
        return err, (abi.ATTR_OUT.unpack(body).attr if not err else None)

    def open(self, nodeid: int, flags: int, open_flags: int = 0) -> int:
        body = self.ok(Opcode.OPEN, abi.OPEN_IN.pack(flags=flags, open_flags=open_flags), nodeid)
        return abi.OPEN_OUT.unpack(body).fh

    def write(self, nodeid: int, fh: int, data: bytes, offset: int = 0,
              write_flags: int = 0) -> int:
        body = self.ok(Opcode.WRITE, abi.WRITE_IN.pack(fh=fh, offset=offset, size=len(data),
                                                       write_flags=write_flags) + data, nodeid)
        return abi.WRITE_OUT.unpack(body).size

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int = 0) -> int:
        if self.flags & abi.FUSE_SETXATTR_EXT:
            head = abi.SETXATTR_IN.pack(size=len(value), flags=flags)
        else:
            head = struct.pack("<II", len(value), flags)      # fuse_setxattr_in before 7.33
        body = head + name + b"\0" + value
        return self.call(Opcode.SETXATTR, body, nodeid)[0]

    def getxattr(self, nodeid: int, name: bytes) -> tuple[int, bytes]:
        return self.call(Opcode.GETXATTR, abi.GETXATTR_IN.pack(size=1 << 16) + name + b"\0",
                         nodeid)

    def listxattr(self, nodeid: int) -> set[bytes]:
        data = self.ok(Opcode.LISTXATTR, abi.GETXATTR_IN.pack(size=1 << 16), nodeid)
        assert not data or data.endswith(b"\0")
        return set(data.split(b"\0")[:-1])

    def removexattr(self, nodeid: int, name: bytes) -> int:
        return self.call(Opcode.REMOVEXATTR, name + b"\0", nodeid)[0]


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    os.chmod(d, 0o755)          # root's: a uid-1000 creation relies on the guest's own checks
    return d


def host_mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def no_setid_anywhere(share) -> None:
    for dirpath, dirnames, filenames in os.walk(share):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            bad = st.st_mode & (stat.S_ISUID if stat.S_ISDIR(st.st_mode) else SETID)
            assert not bad, f"{name}: mode {stat.S_IMODE(st.st_mode):o} on the host"


# ------------------------------------------------------------------------------------------
# Session

def test_init_negotiates_killpriv_v2_and_dont_mask(share):
    g = Guest(share)
    assert g.flags & abi.FUSE_HANDLE_KILLPRIV_V2 and g.flags & abi.FUSE_DONT_MASK


# ------------------------------------------------------------------------------------------
# Set-id bits

@pytest.mark.parametrize("uid", [0, 1000])
def test_no_setid_file_on_the_host_by_default(share, uid):
    g = Guest(share, uid=uid, gid=uid)
    for name, mode in ((b"suid", 0o4755), (b"sgid", 0o2755), (b"both", 0o6777)):
        err, _fh, e = g.create(name, mode)
        assert err == 0
        assert host_mode(share / name.decode()) == mode & 0o777 == stat.S_IMODE(e.attr.mode)
    err, e = g.mknod(b"node", stat.S_IFREG | 0o6777)
    assert err == 0 and stat.S_IMODE(e.attr.mode) == 0o777 == host_mode(share / "node")
    # chmod u+s of a root-owned file (the classic way to a root shell)
    (share / "rootfile").write_bytes(b"#!/bin/sh\n")
    n = g.lookup(b"rootfile")
    err, attr = g.setattr(n, valid=abi.FATTR_MODE, mode=stat.S_IFREG | 0o4777)
    assert err == 0 and stat.S_IMODE(attr.mode) == 0o777 == host_mode(share / "rootfile")
    no_setid_anywhere(share)


def test_setid_bits_stay_with_allow_setid(share):
    g = Guest(share, allow_setid=True)
    err, _fh, e = g.create(b"both", 0o6755)
    assert err == 0 and host_mode(share / "both") == 0o6755 == stat.S_IMODE(e.attr.mode)
    err, e = g.mknod(b"node", stat.S_IFREG | 0o4711)
    assert err == 0 and host_mode(share / "node") == 0o4711
    (share / "rootfile").write_bytes(b"x")
    err, attr = g.setattr(g.lookup(b"rootfile"), valid=abi.FATTR_MODE, mode=0o104777)
    assert err == 0 and host_mode(share / "rootfile") == 0o4777 == stat.S_IMODE(attr.mode)


def test_directory_setgid_is_kept_and_inherited(share):
    """S_ISGID on a directory only passes its group on (POSIX): the policy keeps it."""
    g = Guest(share)
    (share / "team").mkdir()
    os.chown(share / "team", 0, 4444)
    team = g.lookup(b"team")
    err, attr = g.setattr(team, valid=abi.FATTR_MODE, mode=stat.S_IFDIR | 0o6775)
    assert err == 0 and host_mode(share / "team") == 0o2775 == stat.S_IMODE(attr.mode)
    err, sub = g.mkdir(b"sub", 0o755, parent=team)
    st = os.stat(share / "team" / "sub")
    assert err == 0 and (st.st_uid, st.st_gid) == (1000, 4444)
    assert stat.S_IMODE(st.st_mode) == 0o2755 == stat.S_IMODE(sub.attr.mode)
    err, _fh, f = g.create(b"f", 0o644, parent=team)
    st = os.stat(share / "team" / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 4444, 0o644)


def test_setgid_file_in_a_setgid_directory_is_the_guests_decision(share):
    """The guest VFS strips S_ISGID from a file a non-member creates in a set-gid directory
    (it knows the caller's groups); the host must not decide again with fewer groups."""
    g = Guest(share, allow_setid=True)
    (share / "team").mkdir()
    os.chown(share / "team", 0, 4444)
    os.chmod(share / "team", 0o2775)
    err, _fh, e = g.create(b"tool", 0o2755, parent=g.lookup(b"team"))
    st = os.stat(share / "team" / "tool")
    assert err == 0 and (st.st_gid, stat.S_IMODE(st.st_mode)) == (4444, 0o2755)


def host_file(share, name: str, mode: int, data: bytes = b"0123456789") -> None:
    (share / name).write_bytes(data)
    os.chmod(share / name, mode)


def test_write_kills_setid_bits_as_a_local_fs_does(share):
    g = Guest(share)
    host_file(share, "a", 0o6755)
    host_file(share, "b", 0o6745)        # S_ISGID without group execute: a locking mark, kept
    a, b = g.lookup(b"a"), g.lookup(b"b")
    fa, fb = g.open(a, os.O_WRONLY), g.open(b, os.O_WRONLY)
    assert g.write(a, fa, b"root may", 0) == 8           # a caller with CAP_FSETID: no flag
    assert host_mode(share / "a") == 0o6755
    assert g.write(a, fa, b"user", 0, abi.FUSE_WRITE_KILL_SUIDGID) == 4
    assert host_mode(share / "a") == 0o755 and (share / "a").read_bytes() == b"user may89"
    g.write(b, fb, b"u", 0, abi.FUSE_WRITE_KILL_SUIDGID)
    assert host_mode(share / "b") == 0o2745


def test_truncate_open_trunc_and_chown_kill_setid_bits(share):
    g = Guest(share)
    for name in ("t", "o", "c", "x", "own"):
        host_file(share, name, 0o6775)
    # SETATTR size from a caller without CAP_FSETID
    err, attr = g.setattr(g.lookup(b"t"), valid=abi.FATTR_SIZE | abi.FATTR_KILL_SUIDGID, size=3)
    assert err == 0 and host_mode(share / "t") == 0o775 == stat.S_IMODE(attr.mode)
    assert (share / "t").read_bytes() == b"012"
    err, attr = g.setattr(g.lookup(b"x"), valid=abi.FATTR_SIZE, size=3)   # root: no flag
    assert err == 0 and host_mode(share / "x") == 0o6775
    # OPEN and CREATE of an existing file with O_TRUNC
    g.open(g.lookup(b"o"), os.O_WRONLY | os.O_TRUNC, abi.FUSE_OPEN_KILL_SUIDGID)
    assert host_mode(share / "o") == 0o775 and (share / "o").read_bytes() == b""
    err, _fh, _e = g.create(b"c", 0o644, flags=os.O_WRONLY | os.O_TRUNC,
                            open_flags=abi.FUSE_OPEN_KILL_SUIDGID)
    assert err == 0 and host_mode(share / "c") == 0o775
    # chown (the kernel sends FATTR_KILL_SUIDGID with it for non-directories)
    err, attr = g.setattr(g.lookup(b"own"), valid=abi.FATTR_UID | abi.FATTR_GID
                          | abi.FATTR_KILL_SUIDGID, uid=1000, gid=1000)
    st = os.stat(share / "own")
    assert err == 0 and (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o775)


# ------------------------------------------------------------------------------------------
# Device nodes

def test_no_device_node_on_the_host_by_default(share):
    g = Guest(share, uid=0, gid=0)                  # guest root, with CAP_MKNOD in the guest
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        err, _ = g.mknod(b"dev", kind | 0o666, new_encode_dev(1, 3))
        assert err == errno.EPERM
    err, _ = g.mknod(b"dir", stat.S_IFDIR | 0o755)
    assert err == errno.EPERM                       # what mknod(2) says
    # RENAME_WHITEOUT leaves a 0:0 character device at the old name: refused too
    (share / "src").write_bytes(b"x")
    err, _ = g.call(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=1, flags=abi.RENAME_WHITEOUT)
                    + b"src\0dst\0")
    assert err == errno.EPERM
    assert sorted(os.listdir(share)) == ["src"]
    assert stat.S_ISREG(os.lstat(share / "src").st_mode)


def test_device_nodes_with_allow_mknod(share):
    g = Guest(share, uid=0, gid=0, allow_mknod=True)
    for name, kind, major, minor in ((b"null", stat.S_IFCHR, 1, 3),
                                     (b"big", stat.S_IFBLK, 300, 70000)):
        err, e = g.mknod(name, kind | 0o640, new_encode_dev(major, minor))
        st = os.lstat(share / name.decode())
        assert err == 0 and stat.S_IFMT(st.st_mode) == kind and host_mode(st and share / name.decode()) == 0o640
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor)
        assert e.attr.rdev == st.st_rdev
    (share / "src").write_bytes(b"x")
    err, _ = g.call(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=1, flags=abi.RENAME_WHITEOUT)
                    + b"src\0dst\0", uid=1000, gid=1000)
    assert err == 0
    wh = os.lstat(share / "src")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0 and wh.st_uid == 1000
    assert (share / "dst").read_bytes() == b"x"


# ------------------------------------------------------------------------------------------
# Extended attributes

def real_xattrs(path) -> set[bytes]:
    return {os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)}


def test_xattrs_are_remapped_by_default(share):
    g = Guest(share, uid=0, gid=0, posix_acl=False)   # ACLs: tests/test_fs_crosvm_options.py
    host_file(share, "f", 0o755)
    os.setxattr(share / "f", "trusted.host-only", b"h")       # the host's own: not the guest's
    f = g.lookup(b"f")
    for name, value in PROTECTED.items():
        assert g.setxattr(f, name, value) == 0, name
    assert g.setxattr(f, b"user.plain", b"p") == 0
    on_host = real_xattrs(share / "f")
    assert on_host == {b"user.plain", b"trusted.host-only",
                       *(b"user.virtiofs." + n for n in PROTECTED)}
    for name, value in PROTECTED.items():                    # the guest reads back its own
        assert g.getxattr(f, name) == (0, value)
    assert g.listxattr(f) == {b"user.plain", *PROTECTED}
    assert g.getxattr(f, b"trusted.host-only")[0] == errno.ENODATA
    # The private names cannot be reached by spelling them: a guest's user.virtiofs.X is
    # its own name, stored one level deeper.
    assert g.getxattr(f, b"user.virtiofs.security.capability")[0] == errno.ENODATA
    assert g.setxattr(f, b"user.virtiofs.security.capability", b"forged") == 0
    assert os.getxattr(share / "f", "user.virtiofs.security.capability") == CAPABILITY
    assert os.getxattr(share / "f", "user.virtiofs.user.virtiofs.security.capability") \
        == b"forged"
    assert g.getxattr(f, b"security.capability") == (0, CAPABILITY)
    os.setxattr(share / "f", "user.virtiofs.user.planted", b"?")   # not producible: hidden
    assert b"user.planted" not in g.listxattr(f)
    assert g.removexattr(f, b"trusted.overlay.opaque") == 0
    assert b"user.virtiofs.trusted.overlay.opaque" not in real_xattrs(share / "f")


def test_a_write_truncate_or_chown_drops_a_remapped_capability(share):
    """The host kernel drops a real file capability on write; a remapped one is ours to drop,
    or a guest user could rewrite a binary that keeps its capabilities inside the guest."""
    g = Guest(share, uid=0, gid=0)
    for name in ("w", "t", "c"):
        host_file(share, name, 0o755)
        assert g.setxattr(g.lookup(name.encode()), b"security.capability", CAPABILITY) == 0
    w = g.lookup(b"w")
    g.write(w, g.open(w, os.O_WRONLY), b"new code")
    g.setattr(g.lookup(b"t"), valid=abi.FATTR_SIZE, size=0)
    g.setattr(g.lookup(b"c"), valid=abi.FATTR_UID, uid=1000)
    for name in ("w", "t", "c"):
        assert real_xattrs(share / name) == set(), name
        assert g.getxattr(g.lookup(name.encode()), b"security.capability")[0] == errno.ENODATA


def test_xattrs_refused(share):
    g = Guest(share, uid=0, gid=0, xattr_policy="refuse")
    host_file(share, "f", 0o644)
    os.setxattr(share / "f", "trusted.host-only", b"h")
    os.setxattr(share / "f", "user.virtiofs.security.capability", CAPABILITY)
    f = g.lookup(b"f")
    for name, value in PROTECTED.items():
        assert g.setxattr(f, name, value) == errno.EPERM, name
        assert g.getxattr(f, name)[0] == errno.ENODATA
        assert g.removexattr(f, name) == errno.EPERM
    assert g.setxattr(f, b"user.virtiofs.security.capability", b"x") == errno.EPERM
    assert g.setxattr(f, b"user.ok", b"1") == 0
    assert g.listxattr(f) == {b"user.ok"}
    assert real_xattrs(share / "f") == {b"trusted.host-only", b"user.ok",
                                        b"user.virtiofs.security.capability"}


def test_xattrs_passthrough_reach_the_host(share):
    g = Guest(share, uid=0, gid=0, xattr_policy="passthrough")
    host_file(share, "f", 0o755)
    f = g.lookup(b"f")
    assert g.setxattr(f, b"security.capability", CAPABILITY) == 0
    assert g.setxattr(f, b"trusted.overlay.opaque", b"y") == 0
    assert os.getxattr(share / "f", "security.capability") == CAPABILITY
    assert os.getxattr(share / "f", "trusted.overlay.opaque") == b"y"
    assert {b"security.capability", b"trusted.overlay.opaque"} <= g.listxattr(f)


def test_selinux_label_passes_only_when_allowed(share):
    host_file(share, "f", 0o644)
    label = b"system_u:object_r:public_content_t:s0"
    g = Guest(share, uid=0, gid=0, allow_selinux_xattr=True)
    f = g.lookup(b"f")
    assert g.setxattr(f, b"security.selinux", label) == 0
    assert os.getxattr(share / "f", "security.selinux").rstrip(b"\0") == label
    assert g.setxattr(f, b"security.ima", b"x") == 0            # the rest stays remapped
    assert b"user.virtiofs.security.ima" in real_xattrs(share / "f")
    # Without the option the host's label is hidden and a guest label is remapped.
    g2 = Guest(share, uid=0, gid=0)
    f2 = g2.lookup(b"f")
    assert b"security.selinux" not in g2.listxattr(f2)
    assert g2.setxattr(f2, b"security.selinux", b"guest") == 0
    assert os.getxattr(share / "f", "security.selinux").rstrip(b"\0") == label


# ------------------------------------------------------------------------------------------
# Owner and mode of new entries

def test_new_entries_have_the_guests_owner_and_mode_whatever_the_vmm_umask(share):
    g = Guest(share)
    old = os.umask(0o077)            # a VMM started from a strict shell
    try:
        err, d = g.mkdir(b"d", 0o777, umask=0)
        err2, _fh, f = g.create(b"f", 0o666, umask=0o022)
        err3, p = g.mknod(b"p", stat.S_IFIFO | 0o666, umask=0o002)
        err4, s = g.symlink(b"s", b"f")
    finally:
        os.umask(old)
    assert (err, err2, err3, err4) == (0, 0, 0, 0)
    for name, entry, mode in ((b"d", d, 0o777), (b"f", f, 0o644), (b"p", p, 0o664),
                              (b"s", s, 0o777)):
        st = os.lstat(share / name.decode())
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, mode), name
        assert (entry.attr.uid, entry.attr.gid, stat.S_IMODE(entry.attr.mode)) \
            == (1000, 1000, mode), name
    assert os.umask(0o022) == 0o022 and os.umask(0o022) == 0o022   # the umask came back


def test_the_guests_supplementary_groups_are_not_checked_again(share):
    """The guest let uid 1000 create in a directory writable by a group it belongs to (the
    guest knows its groups; FUSE 7.37 does not send them): the host must not refuse."""
    (share / "shared").mkdir()
    os.chown(share / "shared", 0, 4444)
    os.chmod(share / "shared", 0o2770)
    g = Guest(share)
    err, _fh, _e = g.create(b"f", 0o640, parent=g.lookup(b"shared"))
    assert err == 0 and os.stat(share / "shared" / "f").st_uid == 1000


@pytest.fixture
def few_fds():
    """Leave ``free(n)`` fds under RLIMIT_NOFILE (the rest taken by /dev/null fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    taken: list[int] = []

    def free(n: int) -> None:
        while taken:
            os.close(taken.pop())
        # The limit bounds fd numbers: leave room above whatever this process already holds.
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
        try:
            while True:
                taken.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE
        for _ in range(n):
            os.close(taken.pop())

    yield free
    while taken:
        os.close(taken.pop())
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_failed_creation_leaves_nothing_behind(share, few_fds):
    """At fd exhaustion the entry was created, never chowned, and EMFILE was replied: a
    root-owned entry stayed and a retry got EEXIST.  Now the creation is undone."""
    g = Guest(share)
    few_fds(0)
    results = [g.mkdir(b"d", 0o755)[0], g.mknod(b"n", stat.S_IFIFO | 0o644)[0],
               g.symlink(b"s", b"target")[0], g.create(b"c0", 0o644)[0]]
    few_fds(1)                     # CREATE gets its fd, registering the entry needs another
    results.append(g.create(b"c1", 0o644)[0])
    few_fds(64)
    assert results == [errno.EMFILE] * 5
    assert os.listdir(share) == []
    assert g.mkdir(b"d", 0o755)[0] == 0 and g.create(b"c1", 0o644)[0] == 0
    assert os.stat(share / "d").st_uid == os.stat(share / "c1").st_uid == 1000


# ------------------------------------------------------------------------------------------
# Logs a guest can cause

def test_an_init_storm_does_not_flood_the_log(share, caplog):
    g = Guest(share)
    caplog.set_level(logging.INFO)
    for _ in range(2000):
        err, body = g.call(Opcode.INIT, abi.INIT_IN.pack(major=8, minor=0, max_readahead=0,
                                                         flags=0), nodeid=0)
        assert err == 0 and abi.INIT_OUT.unpack(body).major == 7
    for _ in range(500):
        g.call(Opcode.INIT, abi.INIT_IN.pack(major=7, minor=37, max_readahead=0, flags=0),
               nodeid=0)
    lines = [r for r in caplog.records if r.name.startswith("fuse")]
    # 2,500 guest-caused events: the first FULL_WARNINGS in full, then powers of two.
    assert FULL_WARNINGS < len(lines) <= FULL_WARNINGS + 12


def _thread_creds() -> tuple[str, str, str, int]:
    """(Uid line, Gid line, CapEff, umask) of the calling thread, from procfs."""
    status = dict(line.split(":", 1) for line in
                  open("/proc/thread-self/status").read().splitlines() if ":" in line)
    umask = os.umask(0)
    os.umask(umask)
    return status["Uid"].split(), status["Gid"].split(), status["CapEff"].strip(), umask


def test_acting_as_the_caller_leaves_the_thread_as_it_was(share):
    g = Guest(share)
    before = _thread_creds()
    assert g.mkdir(b"d", 0o700, umask=0o077)[0] == 0
    assert g.mkdir(b"d", 0o700)[0] == errno.EEXIST          # the failure path restores too
    assert _thread_creds() == before
    # A uid the kernel cannot switch to never turns into a creation as root.
    assert g.mkdir(b"x", 0o755, uid=0xFFFFFFFF)[0] == errno.EINVAL
    assert g.create(b"y", 0o644, gid=0xFFFFFFFF)[0] == errno.EINVAL
    assert sorted(os.listdir(share)) == ["d"] and _thread_creds() == before
