"""The jail's user namespace (devices/jail/userns.py) for real: a forked child jailed with
uid/gid maps, checked from inside (what it may do) and from outside (/proc/PID/uid_map, who owns
what it created on the host).

Every check has a control: the same child jailed without maps (host root with the same reduced
capabilities) must get the other answer. Needs root (namespaces, mounts, map writing).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import select
import time
from pathlib import Path

import pytest

from devices.jail import JailError, JailSpec, spawn_jailed
from devices.virtio.fs import creds
from tests.test_jail import err_of, proc, status

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root (namespaces, maps)")

WAIT_S = 60          # a bound on waiting for a child, not a timing assertion
#: The host user and group the namespace's 0 becomes; 1..999 inside are 200001.. outside.
HOST = 1000
MAP = ((0, HOST, 1), (1, 200001, 999))
OVERFLOW = int(Path("/proc/sys/fs/overflowuid").read_text())
OVERFLOW_GID = int(Path("/proc/sys/fs/overflowgid").read_text())


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """A share owned by the mapped user, with a root-only file and another user's file."""
    d = tmp_path / "share"
    d.mkdir()
    os.chown(d, HOST, HOST)
    (d / "roots").write_text("root only\n")
    os.chmod(d / "roots", 0o600)
    (d / "public").write_text("anyone\n")
    os.chown(d / "public", 4242, 4242)
    os.chmod(d / "public", 0o644)
    return d


def _workload(jail) -> dict:
    """What a jailed device can do to the share, seen from inside."""
    st = status(jail)     # getresuid/getgroups are outside the seccomp policy: read /proc
    out: dict = {"ids": [st["Uid"].split(), st["Gid"].split(), st["Groups"].split()]}
    out["CapEff"] = int(st["CapEff"], 16)
    out["read_roots"] = err_of(lambda: open("/roots").read())
    out["read_public"] = err_of(lambda: open("/public").read())
    roots = os.stat("/roots")
    out["roots_owner"] = [roots.st_uid, roots.st_gid]
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    out["chmod_roots"] = err_of(lambda: os.chmod("/roots", 0o644))
    fd = os.open("/new", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    os.close(fd)
    new = os.stat("/new")
    out["new_owner"] = [new.st_uid, new.st_gid]
    # fchownat, as the passthrough calls it (plain chown is outside the seccomp policy)
    out["chown_unmapped"] = err_of(lambda: os.chown("new", 5000, 5000, dir_fd=root))
    out["chown_mapped"] = err_of(lambda: os.chown("new", 5, 5, dir_fd=root))

    def create_as(uid: int, name: str) -> None:
        with creds.creating_as(uid, uid, 0o022, True):
            os.close(os.open(f"/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))

    out["create_as_7"] = err_of(lambda: create_as(7, "by7"))
    out["create_as_unmapped"] = err_of(lambda: create_as(4000, "by4000"))
    with open(proc(jail, "self/uid_map")) as f:
        out["own_uid_map"] = f.read().split()
    return out


def run_held(spec: JailSpec, fn) -> tuple[dict, dict[str, str], int]:
    """Run fn(jail) in a jailed child; while the child still lives, read its uid_map, gid_map and
    status from outside. Returns (fn's result, those files, exit code)."""
    r, w = os.pipe()
    hold_r, hold_w = os.pipe()
    spec = dataclasses.replace(spec, keep_fds=spec.keep_fds + (w, hold_r))

    def target(jail) -> int:
        data = json.dumps(fn(jail)).encode() + b"\n"
        while data:
            data = data[os.write(w, data):]
        os.read(hold_r, 1)                          # until the outside has looked
        return 0

    try:
        child = spawn_jailed(target, spec)
    finally:
        os.close(w)
        os.close(hold_r)
    try:
        buf = b""
        deadline = time.monotonic() + WAIT_S
        while not buf.endswith(b"\n"):
            assert select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0], \
                "no answer from the child"
            chunk = os.read(r, 65536)
            assert chunk, "the child exited without an answer"
            buf += chunk
        outside = {name: Path(f"/proc/{child.jailed_pid}/{name}").read_text()
                   for name in ("uid_map", "gid_map", "setgroups", "status")}
        os.write(hold_w, b"x")
        code = child.wait(WAIT_S)
    finally:
        os.close(r)
        os.close(hold_w)
        child.close()
    assert code is not None
    return json.loads(buf), outside, code


def _status_ids(text: str, key: str) -> list[int]:
    line = next(ln for ln in text.splitlines() if ln.startswith(key + ":"))
    return [int(v) for v in line.split()[1:]]


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_jailed_child_holds_only_the_mapped_ids(share, mode):
    got, outside, code = run_held(JailSpec(root=str(share), mode=mode, uid_map=MAP, gid_map=MAP),
                                  _workload)
    assert code == 0
    # from outside: the maps written by the helper, the child's host ids, no groups
    want = [[str(v) for v in r] for r in MAP]
    assert [ln.split() for ln in outside["uid_map"].splitlines()] == want
    assert [ln.split() for ln in outside["gid_map"].splitlines()] == want
    assert outside["setgroups"].strip() == "allow"
    assert _status_ids(outside["status"], "Uid") == [HOST] * 4
    assert _status_ids(outside["status"], "Gid") == [HOST] * 4
    assert _status_ids(outside["status"], "Groups") == []
    # from inside: its own 0, the fs device's capabilities (relative to its namespace)
    assert got["ids"] == [["0"] * 4, ["0"] * 4, []]
    assert got["own_uid_map"] == [v for r in want for v in r]
    from devices.jail import capabilities
    assert got["CapEff"] == capabilities.mask_of(capabilities.FS_DEVICE_CAPS)
    # what it may do: nothing to a file of an unmapped owner beyond "other" bits
    assert got["read_roots"] == errno.EACCES
    assert got["read_public"] == 0
    assert got["roots_owner"] == [OVERFLOW, OVERFLOW_GID]
    assert got["chmod_roots"] == errno.EPERM
    assert got["new_owner"] == [0, 0]
    assert got["chown_mapped"] == 0 and got["chown_unmapped"] == errno.EINVAL
    assert got["create_as_7"] == 0 and got["create_as_unmapped"] == errno.EOVERFLOW
    # on the host: the kernel translated every id
    new, by7 = os.stat(share / "new"), os.stat(share / "by7")
    assert (new.st_uid, new.st_gid) == (200005, 200005)        # chowned to 5 inside
    assert (by7.st_uid, by7.st_gid) == (200007, 200007)
    assert not (share / "by4000").exists()
    assert (share / "roots").stat().st_mode & 0o777 == 0o600


def test_control_without_maps_is_host_root(share):
    """The same workload jailed without maps: host root, every answer the other way."""
    got, outside, code = run_held(JailSpec(root=str(share)), _workload)
    assert code == 0
    assert outside["uid_map"].split() == ["0", "0", "4294967295"]
    assert _status_ids(outside["status"], "Uid") == [0] * 4
    assert got["read_roots"] == 0 and got["chmod_roots"] == 0
    assert got["roots_owner"] == [0, 0] and got["new_owner"] == [0, 0]
    assert got["chown_unmapped"] == 0 and got["create_as_unmapped"] == 0
    assert (os.stat(share / "by4000").st_uid, os.stat(share / "new").st_uid) == (4000, 5)


def test_only_uid_map_leaves_gids_unchanged(share):
    got, outside, code = run_held(JailSpec(root=str(share), uid_map=((0, HOST, 1),)), _workload)
    assert code == 0
    assert outside["gid_map"].split() == ["0", "0", "4294967295"]
    assert _status_ids(outside["status"], "Uid") == [HOST] * 4
    assert _status_ids(outside["status"], "Gid") == [0] * 4
    assert got["create_as_7"] == errno.EOVERFLOW               # uid 7 has no mapping
    assert got["chown_mapped"] == errno.EINVAL                 # uid 5 neither
    new = os.stat(share / "new")
    assert (new.st_uid, new.st_gid) == (HOST, 0)               # gid 0 is host gid 0


def test_spec_checks_maps_before_forking(share):
    with pytest.raises(ValueError, match="needs mode namespace or chroot"):
        JailSpec(mode="none", uid_map=MAP)
    with pytest.raises(ValueError, match="uid_map must map id 0"):
        JailSpec(root=str(share), uid_map=((1, HOST, 1),))
    with pytest.raises(ValueError, match="gid_map range"):
        JailSpec(root=str(share), gid_map=((0, HOST, 0),))
    with pytest.raises(ValueError, match="within 32 bits"):
        JailSpec(root=str(share), uid_map=((0, 0xFFFFFFFF, 1),))
    assert not JailSpec(root=str(share)).userns and JailSpec(root=str(share), gid_map=MAP).userns


def test_map_the_kernel_refuses_is_a_jail_error(share):
    """Overlapping ranges pass the spec's checks but not the kernel's: the writer's reason
    reaches the caller, and nothing of the child is left."""
    with pytest.raises(JailError, match=r"user namespace: writing /proc/\d+/uid_map "
                                        r".*Invalid argument"):
        spawn_jailed(lambda jail: 0, JailSpec(root=str(share),
                                              uid_map=((0, HOST, 10), (5, 3000, 10))))


def test_file_capabilities_set_inside_are_namespaced(share):
    """With CAP_SETFCAP (xattr_policy: passthrough) a v2 security.capability set inside is
    stored as v3 with the namespace's root as its owner: the inside reads back what it set, the
    host's root gets nothing from it. Control: without a user namespace the host gets v2."""
    import struct
    v2 = struct.pack("<IIIII", 0x02000000 | 1, 1 << 13, 0, 0, 0)   # effective, CAP_NET_RAW

    def setcap(jail) -> str:
        fd = os.open("/capfile", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o755)
        try:
            os.setxattr(f"{jail.proc_root}self/fd/{fd}", "security.capability", v2)
            return os.getxattr(f"{jail.proc_root}self/fd/{fd}", "security.capability").hex()
        finally:
            os.close(fd)

    for maps, host_view in (({"uid_map": MAP, "gid_map": MAP},
                             struct.pack("<IIIIII", 0x03000000 | 1, 1 << 13, 0, 0, 0, HOST)),
                            ({}, v2)):
        got, _outside, code = run_held(JailSpec(root=str(share), allow_setfcap=True, **maps),
                                       setcap)
        assert code == 0 and bytes.fromhex(got) == v2
        assert os.getxattr(share / "capfile", "security.capability") == host_view
        os.unlink(share / "capfile")
