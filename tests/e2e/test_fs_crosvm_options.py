"""ascii_casefold, posix_acl and uidmap/gidmap seen from a booted guest (issue 12).

One boot serves several shares with different options (each mounted at /mnt/<tag>), so that the
guest kernel's view of each option is checked against the same workload with the option off.
The agent runs as guest root; the host side is read after the VM is gone.

The project kernel is built without CONFIG_MULTIUSER: inside the guest every uid and gid reads
as 0 (a stat, the ids in an ACL), whatever the device sends.  So the guest-to-host direction of
uidmap is checked on the host (who owns what the guest created), and the host-to-guest direction
on the attributes the device really sent to this guest (recorded in the VMM process); the guest
kernel's own treatment of the translated ids is the unit tests' (tests/test_fs_crosvm_options.py).
"""

from __future__ import annotations

import os
import struct

from devices.virtio.fs import idmap
from tests.e2e.helpers import assert_ok, share, steps_by_op

UNDEF = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
#: The host user a guest root becomes on the mapped share.
HOST_UID = 1000


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def raw(text: str) -> bytes:
    """A binary value from a step line (guest.console already undid the agent's escaping and
    decoded as UTF-8, keeping invalid bytes as surrogates)."""
    return text.encode("utf-8", "surrogateescape")


def test_casefold_idmap_and_acls_in_a_guest(boot, tmp_path, monkeypatch):
    sent: dict[int, tuple[int, int]] = {}          # host inode -> (uid, gid) sent to the guest
    guest_stat = idmap.IdMappedFs.guest_stat

    def record(self, st):
        out = guest_stat(self, st)
        sent[st.st_ino] = (out.st_uid, out.st_gid)
        return out

    monkeypatch.setattr(idmap.IdMappedFs, "guest_stat", record)
    cf, plain, mapped, acls, noacl = (tmp_path / n for n in ("cf", "plain", "map", "acl",
                                                             "noacl"))
    for d in (cf, plain, mapped, acls, noacl):
        d.mkdir()
        os.chmod(d, 0o755)
    # A host collision: two names differing only in case, told apart by their sizes.
    (cf / "Bar").write_bytes(b"BAR")
    (cf / "bar").write_bytes(b"bar!!")
    (plain / "Bar").write_bytes(b"BAR")
    # Owners the guest should see translated: mapped (-> 0) and unmapped (-> overflow).
    for name, owner in (("hosts", HOST_UID), ("stranger", 4242)):
        (mapped / name).write_bytes(b"")
        os.chown(mapped / name, owner, owner)
    value = acl((USER_OBJ, 6, UNDEF), (USER, 6, HOST_UID), (GROUP_OBJ, 4, UNDEF),
                (MASK, 6, UNDEF), (OTHER, 4, UNDEF))
    for d in (mapped, acls, noacl):
        (d / "f").write_bytes(b"")
        os.setxattr(d / "f", "system.posix_acl_access", value)

    script = "\n".join([
        # ascii_casefold
        "create /mnt/cf/Foo",
        "stat /mnt/cf/FOO",
        "mkdir /mnt/cf/foo expect=EEXIST",
        "stat /mnt/cf/BAR",                     # both "Bar" and "bar" match: "Bar" wins
        "stat /mnt/cf/bar",                     # the exact spelling reaches its own entry
        "readdir /mnt/cf",                      # names as stored: Bar, bar, Foo
        "unlink /mnt/cf/FOO",
        "stat /mnt/cf/foo expect=ENOENT",
        "stat /mnt/plain/BAR expect=ENOENT",    # the option off: exact names only
        # uidmap/gidmap
        "create /mnt/map/new",
        "mkdir /mnt/map/dir",
        "create /mnt/plain/new",               # the same creation without a map
        "stat /mnt/map/new",
        "stat /mnt/map/hosts",
        "stat /mnt/map/stranger",
        "getxattr /mnt/map/f system.posix_acl_access",
        # posix_acl on (default) and off
        "getxattr /mnt/acl/f system.posix_acl_access",
        # without it the name is a plain xattr to the guest kernel, remapped by the policy:
        # the host's real ACL is hidden
        "getxattr /mnt/noacl/f system.posix_acl_access expect=ENODATA",
        "exit 0",
    ]) + "\n"
    r = boot(script, shares=(
        # timeout 0: "foo" was cached by the MKDIR's lookup and must not outlive UNLINK FOO
        # (README: a spelling's positive dentry survives a change through another for timeout)
        share(cf, "cf", ascii_casefold=True, timeout=0), share(plain, "plain"),
        # sandbox none: `record` above sees what the device sends only in the VMM's process
        # (the other shares run in the default jailed child)
        share(mapped, "map", uidmap=f"0 {HOST_UID} 1", gidmap=f"0 {HOST_UID} 1", sandbox="none"),
        share(acls, "acl"), share(noacl, "noacl", posix_acl=False)))
    assert_ok(r)
    stats = steps_by_op(r, "stat")
    # casefold: FOO reached Foo (empty), BAR reached "Bar" (3 bytes), bar its own (5 bytes)
    assert [s.extra.get("size") for s in stats[:3]] == ["0", "3", "5"]
    assert steps_by_op(r, "readdir")[0].extra["entries"] == "3"
    assert sorted(os.listdir(cf)) == ["Bar", "bar"]         # UNLINK FOO removed Foo
    # idmap: the guest root's files belong to the host user (root's without the map), and the
    # device told the guest they are root's; unmapped host owners went out as the overflow id.
    for n in ("new", "dir"):
        st = os.stat(mapped / n)
        assert (st.st_uid, st.st_gid) == (HOST_UID, HOST_UID), n
    assert (os.stat(plain / "new").st_uid, os.stat(plain / "new").st_gid) == (0, 0)
    overflow = (int(open("/proc/sys/fs/overflowuid").read()),
                int(open("/proc/sys/fs/overflowgid").read()))
    ino = {n: os.stat(mapped / n).st_ino for n in ("new", "dir", "hosts", "stranger")}
    assert {n: sent.get(i) for n, i in ino.items()} == {
        "new": (0, 0), "dir": (0, 0), "hosts": (0, 0), "stranger": overflow}
    # posix_acl: the guest kernel parsed and returned the host's ACL (its entries; the ids read
    # 0 in a guest without CONFIG_MULTIUSER), on the mapped share too; without posix_acl the
    # guest saw none (ENODATA above).
    def entries(raw: bytes) -> list[tuple[int, int]]:
        assert len(raw) == 4 + 8 * 5 and raw[:4] == struct.pack("<I", 2)
        return [struct.unpack_from("<HH", raw, 4 + 8 * k) for k in range(5)]

    got = [raw(s.extra["value"]) for s in steps_by_op(r, "getxattr")[:2]]
    assert entries(got[0]) == entries(got[1]) == entries(value)


def _jailed_ids(tag: str) -> list[tuple[list[str], list[str]]]:
    """(uid_map lines, Uid of status) of every process serving share `tag` (the jailed child's
    relay and the jailed device itself: both are started as `vmm device fs --options-json`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"device\0fs\0" not in cmd or f'"tag": "{tag}"'.encode() not in cmd:
                continue
            uid_map = open(f"/proc/{pid}/uid_map").read().split()
            uid = next(ln.split()[1:] for ln in open(f"/proc/{pid}/status") if ln.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        found.append((uid_map, uid))
    return found


def test_idmap_through_the_sandbox_user_namespace_in_a_guest(boot, tmp_path):
    """The same uidmap/gidmap on two jailed shares, one applied by the user namespace around the
    device (idmap: auto, the default) and one by the device (idmap: device): a guest root's files
    belong to the mapped host user on both; a root-only host file is readable through the device
    that translates (it is host root) but not through the one in the user namespace, which holds
    only the mapped host ids. (The guest cannot show the overflow owner of an unmapped host file,
    see the module docstring; tests/test_sandbox_userns.py reads it from the jailed child's
    replies.)"""
    ns, dev = tmp_path / "ns", tmp_path / "dev"
    for d in (ns, dev):
        d.mkdir()
        os.chown(d, HOST_UID, HOST_UID)                # the mapped user's directory
        (d / "stranger").write_bytes(b"anyone\n")
        os.chown(d / "stranger", 4242, 4242)
        (d / "secret").write_bytes(b"root only\n")
        os.chmod(d / "secret", 0o600)
    seen: dict[str, list] = {}

    def on_line(line: bytes) -> None:
        if b"name=running" in line:                     # both children are serving now
            seen.update(ns=_jailed_ids("ns"), dev=_jailed_ids("dev"))

    maps = dict(uidmap=f"0 {HOST_UID} 1", gidmap=f"0 {HOST_UID} 1")
    script = "\n".join([
        *(f"create /mnt/{t}/new\nmkdir /mnt/{t}/dir\nread /mnt/{t}/stranger\nstat /mnt/{t}/stranger"
          for t in ("ns", "dev")),
        "read /mnt/ns/secret expect=EACCES",
        "read /mnt/dev/secret",
        "mark running",
        "exit 0",
    ]) + "\n"
    r = boot(script, shares=(share(ns, "ns", **maps), share(dev, "dev", idmap="device", **maps)),
             on_line=on_line)
    assert_ok(r)
    for d in (ns, dev):
        for n in ("new", "dir"):
            st = os.stat(d / n)
            assert (st.st_uid, st.st_gid) == (HOST_UID, HOST_UID), (d, n)
    # while the guest ran: the user namespace's device is the mapped host user, with the map;
    # the other one is host root in the initial namespace (its relay likewise)
    assert (["0", str(HOST_UID), "1"], [str(HOST_UID)] * 4) in seen["ns"]
    assert seen["dev"] and all(m == ["0", "0", "4294967295"] and u == ["0"] * 4
                               for m, u in seen["dev"])
