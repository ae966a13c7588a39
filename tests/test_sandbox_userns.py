"""uidmap/gidmap through the sandbox's user namespace (``idmap: auto|userns|device``), with the
real jailed child the VMM starts (vmm/sandbox.py) serving real FUSE requests over vhost-user.

Checked from outside the way an operator would: /proc/CHILD/uid_map and its ids, who owns on the
host what the guest's callers created, and what the replies told the guest. Each case runs with
the ids applied by the user namespace (the default) and by the device (``idmap: device``): the
translation must be the same, and what differs (the device in a user namespace holds only the
mapped host ids) must differ. Needs root (namespaces, mounts, seccomp).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from devices.virtio.fs.options import FsOptions
from fuse import abi
from tests.fakes import FakeDriverQueue
from tests.test_vhost_user_backend import MiB, QSIZE, Rig
from tests.vhost_user_support import Frontend, MemfdGuest
from vmm.config import ConfigError, parse_shared_dir
from vmm.sandbox import BackendChild

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root (mounts, seccomp)")

HOST = 1000                         # the namespace's 0 (the guest's root) on the host
MAP = f"0 {HOST} 1,1 100001 100"    # guest n (1..100) -> host 100000 + n
OVERFLOW = int(Path("/proc/sys/fs/overflowuid").read_text())
OVERFLOW_GID = int(Path("/proc/sys/fs/overflowgid").read_text())


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


UNDEF = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """Owned by the mapped user (as a crosvm share of a user's directory is), with a host file of
    an unmapped owner readable by anyone, a root-only one, and one of a mapped guest user."""
    d = tmp_path / "share"
    d.mkdir()
    os.chown(d, HOST, HOST)
    (d / "stranger").write_text("anyone may read\n")
    os.chown(d / "stranger", 4242, 4242)
    (d / "secret").write_text("root only\n")
    os.chmod(d / "secret", 0o600)
    (d / "fives").write_text("")
    os.chown(d / "fives", 100005, 100005)
    return d


class ChildRig(Rig):
    """tests.test_vhost_user_backend.Rig driving the jailed child instead of an in-process server,
    with the caller's ids of each request chosen by the test (as the guest kernel sends them)."""

    def __init__(self, options: FsOptions) -> None:  # noqa: D107 - no Rig.__init__: no local server
        self.child = BackendChild(options)
        assert self.child.vhost_sock is not None
        self.fe = Frontend(self.child.vhost_sock)
        self.child.vhost_sock = None
        self.guest = MemfdGuest([(0, 16 * MiB)])
        self.queues = [FakeDriverQueue(self.guest, QSIZE, 0x10000 + 0x10000 * i, MiB * (i + 1))
                       for i in range(2)]
        self.unique = 0
        self.uid = self.gid = 0

    def fuse(self, opcode: int, nodeid: int, args: bytes, out_size: int, *, qi: int = 1,
             kick: bool = True):
        self.unique += 1
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(args), opcode=opcode,
                                 unique=self.unique, nodeid=nodeid, uid=self.uid, gid=self.gid,
                                 pid=1)
        used, reply = self.submit(qi, [hdr] + ([args] if args else []),
                                  [abi.OUT_HEADER.size + out_size], kick=kick)
        out = abi.OUT_HEADER.unpack(reply[:abi.OUT_HEADER.size])
        assert out.unique == self.unique and out.len == used
        return -out.error, reply[abi.OUT_HEADER.size:]

    def init(self, **kw) -> None:
        """INIT with FUSE_POSIX_ACL, as a Linux guest asks for it (so ACL names are ACLs)."""
        err, _ = self.fuse(abi.Opcode.INIT, 0, abi.INIT_IN.pack(
            major=7, minor=37, max_readahead=1 << 17, flags=abi.FUSE_POSIX_ACL), abi.INIT_OUT.size)
        assert err == 0

    def setxattr(self, nodeid: int, name: bytes, value: bytes) -> int:
        head = struct.pack("<II", len(value), 0)          # fuse_setxattr_in before SETXATTR_EXT
        return self.fuse(abi.Opcode.SETXATTR, nodeid, head + name + b"\0" + value, 0)[0]

    def getxattr(self, nodeid: int, name: bytes) -> tuple[int, bytes]:
        err, body = self.fuse(abi.Opcode.GETXATTR, nodeid,
                              abi.GETXATTR_IN.pack(size=4096) + name + b"\0", 4096)
        return err, body

    def as_caller(self, uid: int, gid: int) -> ChildRig:
        self.uid, self.gid = uid, gid
        return self

    def entry(self, name: bytes) -> tuple[int, abi.Any]:
        err, body = self.lookup(name)
        return err, (abi.ENTRY_OUT.unpack(body) if err == 0 else None)

    def create(self, name: bytes) -> int:
        args = abi.CREATE_IN.pack(flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0o022)
        return self.fuse(abi.Opcode.CREATE, 1, args + name + b"\0",
                         abi.ENTRY_OUT.size + abi.OPEN_OUT.size)[0]

    def mkdir(self, name: bytes) -> int:
        return self.fuse(abi.Opcode.MKDIR, 1, abi.MKDIR_IN.pack(mode=0o755, umask=0o022)
                         + name + b"\0", abi.ENTRY_OUT.size)[0]

    def chown(self, nodeid: int, uid: int, gid: int) -> int:
        args = abi.SETATTR_IN.pack(valid=abi.FATTR_UID | abi.FATTR_GID, uid=uid, gid=gid)
        return self.fuse(abi.Opcode.SETATTR, nodeid, args, abi.ATTR_OUT.size)[0]

    def open(self, nodeid: int) -> int:
        return self.fuse(abi.Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags=os.O_RDONLY),
                         abi.OPEN_OUT.size)[0]

    def close(self) -> None:
        self.fe.close()
        code = self.child.close()
        self.guest.close()
        assert code == 0, code


def proc_lines(pid: int, name: str) -> list[list[str]]:
    return [ln.split() for ln in Path(f"/proc/{pid}/{name}").read_text().splitlines()]


def status_ids(pid: int, key: str) -> list[str]:
    return next(ln[1:] for ln in proc_lines(pid, "status") if ln and ln[0] == key + ":")


@pytest.mark.parametrize("where", ["userns", "device"])
def test_mapped_share_through_the_jailed_child(share, where):
    idmap = "auto" if where == "userns" else "device"     # auto: the user namespace here
    rig = ChildRig(FsOptions(source=str(share), tag="t", uidmap=MAP, gidmap=MAP, idmap=idmap))
    try:
        pid = rig.child.jailed_pid
        if where == "userns":
            want = [["0", str(HOST), "1"], ["1", "100001", "100"]]
            assert proc_lines(pid, "uid_map") == proc_lines(pid, "gid_map") == want
            assert status_ids(pid, "Uid") == status_ids(pid, "Gid") == [str(HOST)] * 4
            assert status_ids(pid, "Groups") == []
            # RLIMIT_NOFILE was raised before the unshare (CAP_SYS_RESOURCE of the initial
            # namespace): max_inodes + max_handles + 256, as without a user namespace
            limit = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                         if ln.startswith("Max open files")).split()[3:5]
            assert limit == [str(16384 + 1024 + 256)] * 2
        else:                                           # host root, translating itself
            assert proc_lines(pid, "uid_map") == [["0", "0", "4294967295"]]
            assert status_ids(pid, "Uid") == ["0"] * 4
        rig.up()
        rig.init()
        # host -> guest: a mapped owner as its guest id, unmapped ones as the overflow ids
        owners = {}
        for name in (b"stranger", b"secret", b"fives"):
            err, e = rig.entry(name)
            assert err == 0, name
            owners[name] = (e.attr.uid, e.attr.gid)
        assert owners == {b"stranger": (OVERFLOW, OVERFLOW_GID), b"secret": (OVERFLOW, OVERFLOW_GID),
                          b"fives": (5, 5)}
        # guest -> host: creations as the caller, chown to guest ids
        assert rig.as_caller(0, 0).create(b"by-root") == 0
        assert rig.as_caller(5, 5).mkdir(b"by-five") == 0
        assert rig.as_caller(4000, 4000).create(b"by-nobody") == errno.EOVERFLOW
        err, e = rig.as_caller(0, 0).entry(b"by-root")
        assert err == 0 and (e.attr.uid, e.attr.gid) == (0, 0)
        assert rig.chown(e.nodeid, 7, 7) == 0
        assert rig.chown(e.nodeid, 5000, 5000) == errno.EINVAL
        # POSIX ACL ids both ways (the kernel's posix_acl_xattr translation in the namespace)
        err, fives = rig.entry(b"fives")
        guest_acl = acl((USER_OBJ, 6, UNDEF), (USER, 6, 3), (GROUP_OBJ, 4, UNDEF), (GROUP, 4, 0),
                        (MASK, 6, UNDEF), (OTHER, 0, UNDEF))
        assert rig.setxattr(fives.nodeid, b"system.posix_acl_access", guest_acl) == 0
        assert rig.getxattr(fives.nodeid, b"system.posix_acl_access") == (0, guest_acl)
        host_acl = os.getxattr(share / "fives", "system.posix_acl_access")
        assert struct.pack("<HHI", USER, 6, 100003) in host_acl
        assert struct.pack("<HHI", GROUP, 4, HOST) in host_acl
        bad = acl((USER_OBJ, 6, UNDEF), (USER, 6, 9999), (GROUP_OBJ, 4, UNDEF), (MASK, 6, UNDEF),
                  (OTHER, 0, UNDEF))
        assert rig.setxattr(fives.nodeid, b"system.posix_acl_access", bad) == errno.EINVAL
        # the difference: in the user namespace the device cannot open a root-only host file
        err, secret = rig.entry(b"secret")
        assert rig.open(secret.nodeid) == (errno.EACCES if where == "userns" else 0)
        err, stranger = rig.entry(b"stranger")
        assert rig.open(stranger.nodeid) == 0           # "other" may read it either way
    finally:
        rig.close()
    ids = {n: (os.stat(share / n).st_uid, os.stat(share / n).st_gid)
           for n in ("by-root", "by-five")}
    assert ids == {"by-root": (100007, 100007), "by-five": (100005, 100005)}
    assert not (share / "by-nobody").exists()


def test_without_maps_no_user_namespace(share):
    rig = ChildRig(FsOptions(source=str(share), tag="t"))
    try:
        assert proc_lines(rig.child.jailed_pid, "uid_map") == [["0", "0", "4294967295"]]
    finally:
        rig.close()


def test_fallback_to_the_device_is_one_warning_line(share, capfd):
    """allow_mknod needs CAP_MKNOD of the initial namespace: auto keeps the device translating
    and says why, once; idmap: userns refuses the combination at configuration time."""
    rig = ChildRig(FsOptions(source=str(share), tag="t", uidmap=MAP, gidmap=MAP,
                             allow_mknod=True))
    try:
        assert proc_lines(rig.child.jailed_pid, "uid_map") == [["0", "0", "4294967295"]]
        rig.up()
        rig.init()
        assert rig.as_caller(0, 0).create(b"f") == 0
    finally:
        rig.close()
    assert os.stat(share / "f").st_uid == HOST          # still translated, by the device
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "uidmap/gidmap" in ln]
    assert len(lines) == 1 and lines[0].endswith(
        "virtio-fs t: uidmap/gidmap translated by the device, not a user namespace: "
        "allow_mknod: device nodes need CAP_MKNOD of the initial user namespace")
    with pytest.raises(ValueError, match="idmap: userns is not possible: allow_mknod"):
        FsOptions(source=str(share), tag="t", uidmap=MAP, allow_mknod=True, idmap="userns")


def test_idmap_key(share, tmp_path):
    assert FsOptions(source=str(share), tag="t").idmap == "auto"
    assert parse_shared_dir(f"{share}:t:uidmap=0 1000 1:idmap=userns").idmap == "userns"
    assert parse_shared_dir(f"{share}:t:uidmap=0 1000 1:idmap=device").idmap == "device"
    with pytest.raises(ConfigError, match=r"idmap: must be one of auto, userns, device, got 'x'"):
        parse_shared_dir(f"{share}:t:idmap=x")
    for bad, why in (
            ("idmap=userns", "idmap: userns needs a uidmap or gidmap"),
            ("uidmap=0 1000 1:sandbox=none:idmap=userns", "sandbox: none runs the device"),
            ("uidmap=1 1000 1:idmap=userns", "uidmap leaves uid 0 unmapped"),
            ("gidmap=5 1000 1:idmap=userns", "gidmap leaves gid 0 unmapped")):
        with pytest.raises(ConfigError, match=why):
            parse_shared_dir(f"{share}:t:{bad}")
    cfg = tmp_path / "vm.yaml"
    cfg.write_text(f"devices:\n  - type: fs\n    source: {share}\n    tag: t\n"
                   "    uidmap: 0 1000 1\n    idmap: device\n")
    from vmm.config import load_config
    assert load_config(cfg).devices[0].idmap == "device"
    cfg.write_text(f"devices:\n  - type: fs\n    source: {share}\n    tag: t\n    idmap: kernel\n")
    with pytest.raises(ConfigError, match=r"devices\[0\]\.idmap: must be one of auto"):
        load_config(cfg)


def _no_user_namespaces() -> None:
    """In the back-end's process before its exec (a real kernel refusal, as a container's
    seccomp profile or user.max_user_namespaces=0 gives): unshare with CLONE_NEWUSER is EPERM,
    everything else runs."""
    from devices.jail import _sys, namespaces, seccomp
    from devices.jail.syscall_table import MAX_KNOWN
    unshare = 272
    rules: dict = {nr: None for nr in range(MAX_KNOWN + 1)}
    rules[unshare] = seccomp.ArgMaskEq(0, namespaces.CLONE_NEWUSER, 0)
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    seccomp.install(seccomp.compile_filter(rules, seccomp.SECCOMP_RET_ERRNO | errno.EPERM))


def _backend(share: Path, sandbox: str | None = None, preexec=None, **options):
    """`python -m vmm device fs --fd N` on `share` (as the VMM starts it, without the stats
    channel) and a ChildRig speaking to it; returns (process, rig)."""
    import json
    import subprocess
    import sys
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = [sys.executable, "-m", "vmm", "device", "fs", "--fd", str(b.fileno()),
           "--options-json", json.dumps({"source": str(share), "tag": "t", **options})]
    proc = subprocess.Popen(cmd + (["--sandbox", sandbox] if sandbox else []),
                            cwd=Path(__file__).resolve().parent.parent, pass_fds=(b.fileno(),),
                            preexec_fn=preexec)
    b.close()
    rig = ChildRig.__new__(ChildRig)
    rig.fe = Frontend(a)
    rig.guest = MemfdGuest([(0, 16 * MiB)])
    rig.queues = [FakeDriverQueue(rig.guest, QSIZE, 0x10000 + 0x10000 * i, MiB * (i + 1))
                  for i in range(2)]
    rig.unique, rig.uid, rig.gid = 0, 0, 0
    return proc, rig


def _finish(proc, rig) -> None:
    rig.fe.close()
    rig.guest.close()
    assert proc.wait(60) == 0


def _device_translates(rig) -> None:
    """Mount, create `n` and look up a host file of an unmapped owner: the device itself shows
    that owner as the overflow ids (no kernel user namespace translates for it)."""
    rig.up()
    rig.init()
    assert rig.create(b"n") == 0
    err, e = rig.entry(b"stranger")
    assert (e.attr.uid, e.attr.gid) == (OVERFLOW, OVERFLOW_GID)


def test_standalone_back_end_with_sandbox_none_translates(share):
    """`device fs --sandbox none` on a share whose options say namespace: no jail, so no user
    namespace; the device must translate (not leave the ids to a kernel that does not)."""
    proc, rig = _backend(share, "none", uidmap=MAP, gidmap=MAP)
    try:
        _device_translates(rig)
    finally:
        _finish(proc, rig)
    assert (os.stat(share / "n").st_uid, os.stat(share / "n").st_gid) == (HOST, HOST)


@pytest.mark.parametrize("idmap", ["auto", "userns"])
def test_host_without_user_namespaces(share, idmap, capfd):
    """Where the kernel refuses a user namespace, `auto` keeps the jail and the maps (translated
    by the device, one warning line says why) and `userns` refuses to serve, saying why."""
    proc, rig = _backend(share, preexec=_no_user_namespaces, uidmap=MAP, gidmap=MAP,
                         idmap=idmap)
    if idmap == "userns":
        assert proc.wait(60) == 1
        rig.fe.close()
        rig.guest.close()
        err = capfd.readouterr().err
        assert "UserNamespaceUnavailable: no user namespace here: [Errno 1] unshare" in err, err
        return
    try:
        _device_translates(rig)
        err, secret = rig.entry(b"secret")
        assert rig.open(secret.nodeid) == 0             # a host-root device, jailed as before
    finally:
        _finish(proc, rig)
    assert (os.stat(share / "n").st_uid, os.stat(share / "n").st_gid) == (HOST, HOST)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "uidmap/gidmap" in ln]
    assert len(lines) == 1 and lines[0].endswith(
        "virtio-fs t: uidmap/gidmap translated by the device, not a user namespace: no user "
        "namespace here: [Errno 1] unshare(0x7c020000): Operation not permitted")


def test_share_not_owned_by_the_mapped_user_is_one_warning(tmp_path, capfd):
    """A share of root's (as tmp_path is): the guest's root, the mapped host user, may only do
    what "other" may there; the child says so when it starts, and the kernel enforces it."""
    d = tmp_path / "rootshare"
    d.mkdir()
    os.chmod(d, 0o755)
    rig = ChildRig(FsOptions(source=str(d), tag="r", uidmap=MAP, gidmap=MAP))
    try:
        rig.up()
        rig.init()
        assert rig.as_caller(0, 0).create(b"f") == errno.EACCES
    finally:
        rig.close()
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "shared directory" in ln]
    assert len(lines) == 1 and "does not belong to the host uid the namespace's 0 maps to " \
        f"(it shows as uid {OVERFLOW} inside)" in lines[0]
