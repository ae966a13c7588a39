"""crosvm's ascii_casefold, posix_acl, uidmap/gidmap and security_ctx (issue 12), through the
real FUSE server in front of the real passthrough on a temporary share.

The filesystem is built by ``passthrough_factory``, the device's own builder, so the id maps'
wrapper (devices/virtio/fs/idmap.py) is the one a VM gets.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest
import yaml

from devices.virtio.fs import casefold, idmap, secctx
from devices.virtio.fs.device import passthrough_factory
from devices.virtio.fs.options import FsOptions
from fuse import abi
from fuse.abi import Opcode
from tests.test_passthrough_policy import Guest
from vmm.config import ConfigError, parse_config, parse_shared_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="!!! needs root (creates as other uids)")


class Dev(Guest):
    """The policy tests' guest, in front of the filesystem a VM's device would build."""

    def __init__(self, share, uid: int = 0, gid: int = 0, **options) -> None:
        super().__init__(share, uid, gid, **options)

    def make_fs(self, options: FsOptions):
        return passthrough_factory(options)

    def entry(self, name: bytes, parent: int = 1) -> tuple[int, object]:
        err, body = self.call(Opcode.LOOKUP, name + b"\0", parent)
        return err, (abi.ENTRY_OUT.unpack(body) if not err else None)

    def unlink(self, name: bytes, parent: int = 1) -> int:
        return self.call(Opcode.UNLINK, name + b"\0", parent)[0]

    def rmdir(self, name: bytes, parent: int = 1) -> int:
        return self.call(Opcode.RMDIR, name + b"\0", parent)[0]

    def rename(self, old: bytes, new: bytes, parent: int = 1, flags: int = 0) -> int:
        return self.call(Opcode.RENAME2, abi.RENAME2_IN.pack(newdir=parent, flags=flags)
                         + old + b"\0" + new + b"\0", parent)[0]

    def link(self, nodeid: int, new: bytes, parent: int = 1) -> int:
        return self.call(Opcode.LINK, abi.LINK_IN.pack(oldnodeid=nodeid) + new + b"\0",
                         parent)[0]

    def getattr(self, nodeid: int) -> object:
        return abi.ATTR_OUT.unpack(self.ok(Opcode.GETATTR, abi.GETATTR_IN.pack(), nodeid)).attr


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


def names(share) -> set[str]:
    return set(os.listdir(share))


# ------------------------------------------------------------------------------------------
# ascii_casefold

def test_pick_prefers_the_exact_name_then_the_bytewise_smallest():
    stored = [b"foo", b"Foo", b"FOO", b"bar"]
    assert casefold.pick(b"foo", stored) == b"foo"
    assert casefold.pick(b"fOo", stored) == b"FOO"            # "FOO" < "Foo" < "foo"
    assert casefold.pick(b"fOo", list(reversed(stored))) == b"FOO"   # order-independent
    assert casefold.pick(b"BAR", stored) == b"bar"
    assert casefold.pick(b"baz", stored) is None
    # Only ASCII folds: the UTF-8 of "É" and "é" differ beyond A-Z.
    assert casefold.pick("É".encode(), ["é".encode()]) is None


def test_lookup_is_case_insensitive_only_with_the_option(share):
    (share / "ReadMe.txt").write_bytes(b"x")
    ino = os.stat(share / "ReadMe.txt").st_ino
    plain = Dev(share)
    assert plain.entry(b"README.TXT")[0] == errno.ENOENT
    g = Dev(share, ascii_casefold=True)
    for spelling in (b"README.TXT", b"readme.txt", b"ReadMe.txt"):
        err, e = g.entry(spelling)
        assert err == 0 and e.attr.ino == ino, spelling
    assert g.entry(b"README.TXTX")[0] == errno.ENOENT


def test_collision_exact_spelling_wins_else_the_smallest(share):
    for n in ("foo", "Foo"):
        (share / n).write_bytes(n.encode())
    ino = {n: os.stat(share / n).st_ino for n in ("foo", "Foo")}
    g = Dev(share, ascii_casefold=True)
    assert g.entry(b"foo")[1].attr.ino == ino["foo"]
    assert g.entry(b"Foo")[1].attr.ino == ino["Foo"]
    assert g.entry(b"FOO")[1].attr.ino == ino["Foo"]
    assert g.entry(b"fOO")[1].attr.ino == ino["Foo"]
    # READDIR lists the names as the host stores them, both of them.
    from fuse.filesystem import Context
    ctx = Context(0, 0, 1)
    fh, _ = g.fs.opendir(ctx, 1, 0)
    assert {d.name for d in g.fs.readdir(ctx, 1, fh, 0)} == {b".", b"..", b"foo", b"Foo"}
    g.fs.releasedir(ctx, 1, fh)
    # UNLINK of another spelling removes the same one LOOKUP reaches.
    assert g.unlink(b"FOO") == 0
    assert names(share) == {"foo"}


def test_creations_meet_the_existing_entry_of_another_case(share):
    (share / "docs").mkdir()
    (share / "notes").write_bytes(b"keep")
    g = Dev(share, ascii_casefold=True)
    assert g.mkdir(b"DOCS", 0o755)[0] == errno.EEXIST
    assert g.mknod(b"Notes", stat.S_IFIFO | 0o644)[0] == errno.EEXIST
    assert g.symlink(b"NOTES", b"target")[0] == errno.EEXIST
    assert g.create(b"NOTES", 0o644, flags=os.O_RDWR | os.O_EXCL)[0] == errno.EEXIST
    err, _fh, e = g.create(b"NOTES", 0o644)          # no O_EXCL: opens the existing file
    assert err == 0 and e.attr.ino == os.stat(share / "notes").st_ino
    assert g.link(g.lookup(b"notes"), b"NoTeS") == errno.EEXIST
    assert names(share) == {"docs", "notes"}
    assert (share / "notes").read_bytes() == b"keep"
    # A name with no variant is created as the guest spelled it.
    assert g.mkdir(b"New", 0o755)[0] == 0
    assert names(share) == {"docs", "notes", "New"}


def test_unlink_rmdir_rename_reach_the_stored_entry(share):
    (share / "dir").mkdir()
    (share / "a").write_bytes(b"a")
    (share / "b").write_bytes(b"b")
    (share / "x").write_bytes(b"x")
    g = Dev(share, ascii_casefold=True)
    assert g.rmdir(b"DIR") == 0
    assert g.rename(b"A", b"B") == 0                 # a replaces b, under b's stored name
    assert names(share) == {"b", "x"} and (share / "b").read_bytes() == b"a"
    assert g.rename(b"x", b"X") == 0                 # a rename to another case of itself
    assert names(share) == {"b", "X"}
    assert g.unlink(b"nothing") == errno.ENOENT


def test_casefold_refuses_a_negative_timeout():
    with pytest.raises(ValueError, match="negative_timeout must be 0 with ascii_casefold"):
        FsOptions(source="/tmp", tag="t", ascii_casefold=True, negative_timeout=1)
    FsOptions(source="/tmp", tag="t", ascii_casefold=True)


# ------------------------------------------------------------------------------------------
# posix_acl

def acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


UNDEF = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def test_posix_acl_is_negotiated_by_default_and_can_be_turned_off(share):
    assert Dev(share).flags & abi.FUSE_POSIX_ACL
    assert not Dev(share, posix_acl=False).flags & abi.FUSE_POSIX_ACL


def test_a_guest_acl_is_the_hosts_and_the_host_keeps_the_mode_in_step(share):
    """The guest kernel leaves mode/ACL consistency to the server under FUSE_POSIX_ACL: the host
    kernel does it because the ACL is a real one there (policy.ACL_NAMES)."""
    (share / "f").write_bytes(b"x")
    os.chmod(share / "f", 0o644)
    g = Dev(share)
    f = g.lookup(b"f")
    value = acl((USER_OBJ, 6, UNDEF), (USER, 7, 4242), (GROUP_OBJ, 4, UNDEF), (MASK, 7, UNDEF),
                (OTHER, 4, UNDEF))
    assert g.setxattr(f, b"system.posix_acl_access", value) == 0
    assert os.getxattr(share / "f", "system.posix_acl_access") == value
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o674      # group bits = the mask
    assert stat.S_IMODE(g.getattr(f).mode) == 0o674
    err, got = g.getxattr(f, b"system.posix_acl_access")
    assert err == 0 and got == value
    assert g.setattr(f, valid=abi.FATTR_MODE, mode=0o640)[0] == 0   # chmod moves the mask
    entries = os.getxattr(share / "f", "system.posix_acl_access")
    assert struct.pack("<HHI", MASK, 4, UNDEF) in entries


def test_a_default_acl_is_inherited_and_replaces_the_umask(share):
    (share / "d").mkdir()
    g = Dev(share, uid=1000, gid=1000)
    d = g.lookup(b"d")
    default = acl((USER_OBJ, 7, UNDEF), (GROUP_OBJ, 7, UNDEF), (OTHER, 7, UNDEF))
    assert g.setxattr(d, b"system.posix_acl_default", default, ) == 0
    err, _fh, _e = g.create(b"f", 0o666, umask=0o077, parent=d)
    assert err == 0
    # The umask 077 would give 0600; under a default ACL the host ignores it (POSIX).
    assert stat.S_IMODE(os.stat(share / "d" / "f").st_mode) == 0o666


def test_acl_names_follow_the_policy_without_posix_acl_or_under_refuse(share):
    (share / "f").write_bytes(b"x")
    value = acl((USER_OBJ, 6, UNDEF), (GROUP_OBJ, 4, UNDEF), (OTHER, 4, UNDEF))
    off = Dev(share, posix_acl=False)
    assert off.setxattr(off.lookup(b"f"), b"system.posix_acl_access", value) == 0
    assert b"user.virtiofs.system.posix_acl_access" in map(os.fsencode,
                                                            os.listxattr(share / "f"))
    refuse = Dev(share, xattr_policy="refuse")
    assert refuse.setxattr(refuse.lookup(b"f"), b"system.posix_acl_access", value) == errno.EPERM
    # The remapped copy from before is not an ACL the guest sees under posix_acl.
    g = Dev(share)
    assert g.getxattr(g.lookup(b"f"), b"system.posix_acl_access")[0] == errno.ENODATA


# ------------------------------------------------------------------------------------------
# uidmap / gidmap

MAPS = dict(uidmap="0 1000 1,1 100000 100", gidmap="0 1000 1,1 100000 100")


def test_idmap_parse_and_translate():
    m = idmap.IdMap.parse("0 1000 1, 1 100000 65535")
    assert (m.to_host(0), m.to_host(1), m.to_host(65535), m.to_host(65536)) == (1000, 100000,
                                                                               165534, None)
    assert (m.to_guest(1000), m.to_guest(100004), m.to_guest(0)) == (0, 5, None)
    for bad in ("", "0 1000", "0 1000 0", "a b c", "0 1000 1,0 2000 1", "0 1000 1,5 1000 1",
                "0 4294967290 10", "-1 5 1"):
        with pytest.raises(ValueError):
            idmap.IdMap.parse(bad)


def test_guest_root_creates_as_the_mapped_host_user_and_sees_root(share):
    g = Dev(share, uid=0, gid=0, **MAPS)
    err, _fh, e = g.create(b"f", 0o644)
    assert err == 0 and (e.attr.uid, e.attr.gid) == (0, 0)
    assert g.mkdir(b"d", 0o755)[1].attr.uid == 0
    assert g.symlink(b"l", b"f")[1].attr.uid == 0
    for n in ("f", "d", "l"):
        st = os.lstat(share / n)
        assert (st.st_uid, st.st_gid) == (1000, 1000), n
    g.uid = g.gid = 5                                     # guest 5 is host 100004
    assert g.mkdir(b"d5", 0o755)[1].attr.uid == 5
    assert os.stat(share / "d5").st_uid == 100004


def test_replies_translate_host_owners_and_unmapped_ones_overflow(share):
    for name, owner in (("mine", 1000), ("five", 100004), ("stranger", 4242)):
        (share / name).write_bytes(b"")
        os.chown(share / name, owner, owner)
    overflow = int(open("/proc/sys/fs/overflowuid").read())
    g = Dev(share, **MAPS)
    got = {n: g.entry(n.encode())[1].attr.uid for n in ("mine", "five", "stranger")}
    assert got == {"mine": 0, "five": 5, "stranger": overflow}
    assert g.getattr(g.lookup(b"five")).gid == 5
    # READDIRPLUS carries attributes too.
    fs = g.fs
    from fuse.filesystem import Context
    ctx = Context(0, 0, 1)
    fh, _ = fs.opendir(ctx, 1, 0)
    plus = {d.name: e.attr.st_uid for d, e in fs.readdirplus(ctx, 1, fh, 0) if e.attr}
    assert plus == {b"mine": 0, b"five": 5, b"stranger": overflow}


def test_unmapped_callers_and_owners_are_refused(share):
    (share / "f").write_bytes(b"")
    g = Dev(share, uid=0, gid=0, **MAPS)
    f = g.lookup(b"f")
    g.uid = 500                                           # no host id
    assert g.create(b"new", 0o644)[0] == errno.EOVERFLOW
    assert g.mkdir(b"newd", 0o755)[0] == errno.EOVERFLOW
    assert names(share) == {"f"}
    g.uid = 0
    assert g.setattr(f, valid=abi.FATTR_UID | abi.FATTR_GID, uid=3, gid=3)[1].uid == 3
    assert os.stat(share / "f").st_uid == 100002
    assert g.setattr(f, valid=abi.FATTR_UID, uid=7777)[0] == errno.EINVAL
    assert os.stat(share / "f").st_uid == 100002


def test_acl_ids_are_translated_both_ways(share):
    (share / "f").write_bytes(b"")
    g = Dev(share, **MAPS)
    f = g.lookup(b"f")
    guest_acl = acl((USER_OBJ, 6, UNDEF), (USER, 6, 3), (GROUP_OBJ, 4, UNDEF),
                    (GROUP, 4, 0), (MASK, 6, UNDEF), (OTHER, 0, UNDEF))
    assert g.setxattr(f, b"system.posix_acl_access", guest_acl) == 0
    host = os.getxattr(share / "f", "system.posix_acl_access")
    assert struct.pack("<HHI", USER, 6, 100002) in host
    assert struct.pack("<HHI", GROUP, 4, 1000) in host
    assert g.getxattr(f, b"system.posix_acl_access") == (0, guest_acl)
    bad = acl((USER_OBJ, 6, UNDEF), (USER, 6, 9999), (GROUP_OBJ, 4, UNDEF), (MASK, 6, UNDEF),
              (OTHER, 0, UNDEF))
    assert g.setxattr(f, b"system.posix_acl_access", bad) == errno.EINVAL


# ------------------------------------------------------------------------------------------
# security_ctx

def test_security_ctx_is_refused_here_with_the_reason(share):
    with pytest.raises(ConfigError) as ei:
        parse_shared_dir(f"{share}:t:security_ctx=true")
    msg = str(ei.value)
    assert "\n" not in msg and "security_ctx cannot be enabled on this host" in msg
    assert "/proc/thread-self/attr/fscreate" in msg or "not parsed" in msg
    with pytest.raises(ConfigError, match="security_ctx"):
        parse_config(yaml.safe_load(f"devices:\n  - type: fs\n    source: {share}\n    tag: t\n"
                     f"    security_ctx: true\n"), "c.yaml", share)
    assert not FsOptions(source=str(share), tag="t").security_ctx


def test_secctx_probe_names_why(tmp_path):
    writable = tmp_path / "fscreate"
    writable.write_bytes(b"")
    assert secctx._probe(str(writable)) is None
    assert "not parsed" in secctx.unsupported_reason(str(writable))
    assert "cannot read" in secctx._probe(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------
# configuration spellings

def test_config_keys_yaml_and_shared_dir(share):
    o = parse_shared_dir(f"{share}:t:ascii_casefold=true:posix_acl=false:uidmap=0 1000 1:"
                         "gidmap=0 1000 1,1 2000 5")
    assert (o.ascii_casefold, o.posix_acl, o.uidmap, o.gidmap) == (
        True, False, "0 1000 1", "0 1000 1,1 2000 5")
    c = parse_config(yaml.safe_load(f"devices:\n  - type: fs\n    source: {share}\n    tag: t\n"
                     "    ascii_casefold: true\n    uidmap: 0 1000 1\n"), "c.yaml", share)
    (dev,) = [d for d in c.devices if isinstance(d, FsOptions)]
    assert dev.ascii_casefold and dev.uidmap == "0 1000 1" and dev.posix_acl
    for bad, key in (("uidmap=0 1000", "uidmap"), ("gidmap=1 2 3,2 9 1", "gidmap"),
                     ("posix_acl=1", "posix_acl")):
        with pytest.raises(ConfigError, match=key) as ei:
            parse_shared_dir(f"{share}:t:{bad}")
        assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------
# hostile input

@pytest.mark.parametrize("seed", [11, 12])
def test_fuzz_with_casefold_idmap_and_acls_finds_nothing(seed):
    """The structure-aware fuzzer (bench/fuzz_fuse.py) against the options' code paths: the
    casefold scan on every missing name, the id-map wrapper on every reply with attributes."""
    import dataclasses
    import logging

    from bench.fuzz_fuse import fuzz

    def factory(options: FsOptions):
        return passthrough_factory(dataclasses.replace(
            options, ascii_casefold=True, negative_timeout=0.0,
            uidmap="0 1000 1,1 100000 65535", gidmap="0 1000 1,1 100000 65535"))

    logging.disable(logging.WARNING)
    try:
        findings, stats = fuzz(seed, steps=2000, fs_factory=factory)
    finally:
        logging.disable(logging.NOTSET)
    assert stats.requests == 2000
    assert not findings, "\n".join(map(str, findings[:10]))
    assert {"LOOKUP", "CREATE", "SETATTR"} <= stats.ok.keys()
