"""ascii_casefold, posix_acl and uidmap/gidmap seen from a booted guest (issue 12).

One boot serves several shares with different options (each mounted at /mnt/<tag>), so that the
guest kernel's view of each option is checked against the same workload with the option off.
The agent runs as guest root; the host side is read after the VM is gone.
"""

from __future__ import annotations

import os
import re
import struct

from tests.e2e.helpers import assert_ok, share, steps_by_op

UNDEF = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
#: The host user a guest root becomes on the mapped share.
HOST_UID = 1000


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def unescape(text: str) -> bytes:
    """The agent's escaping of binary values (\\xHH for anything but printable ASCII)."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                  text.encode("latin-1"))


def test_casefold_idmap_and_acls_in_a_guest(boot, tmp_path):
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
        "stat /mnt/map/new",
        "stat /mnt/map/hosts",
        "stat /mnt/map/stranger",
        "getxattr /mnt/map/f system.posix_acl_access",
        # posix_acl on (default) and off
        "getxattr /mnt/acl/f system.posix_acl_access",
        "getxattr /mnt/noacl/f system.posix_acl_access expect=EOPNOTSUPP",
        "exit 0",
    ]) + "\n"
    r = boot(script, shares=(
        share(cf, "cf", ascii_casefold=True), share(plain, "plain"),
        share(mapped, "map", uidmap=f"0 {HOST_UID} 1", gidmap=f"0 {HOST_UID} 1"),
        share(acls, "acl"), share(noacl, "noacl", posix_acl=False)))
    assert_ok(r)
    stats = steps_by_op(r, "stat")
    # casefold: FOO reached Foo (empty), BAR reached "Bar" (3 bytes), bar its own (5 bytes)
    assert [s.extra.get("size") for s in stats[:3]] == ["0", "3", "5"]
    assert steps_by_op(r, "readdir")[0].extra["entries"] == "3"
    assert sorted(os.listdir(cf)) == ["Bar", "bar"]         # UNLINK FOO removed Foo
    # idmap: the guest root's files belong to the host user; the guest sees root
    for n in ("new", "dir"):
        st = os.stat(mapped / n)
        assert (st.st_uid, st.st_gid) == (HOST_UID, HOST_UID), n
    overflow = open("/proc/sys/fs/overflowuid").read().strip()
    new, hosts, stranger = stats[5:8]
    assert (new.extra["uid"], new.extra["gid"]) == ("0", "0")
    assert (hosts.extra["uid"], hosts.extra["gid"]) == ("0", "0")
    assert stranger.extra["uid"] == overflow
    # The ACL the guest kernel parsed names guest uid 0 on the mapped share, the host's uid
    # elsewhere; without posix_acl the guest kernel has no ACLs (EOPNOTSUPP above).
    got = [unescape(s.extra["value"]) for s in steps_by_op(r, "getxattr")[:2]]
    assert got[0] == acl((USER_OBJ, 6, UNDEF), (USER, 6, 0), (GROUP_OBJ, 4, UNDEF),
                         (MASK, 6, UNDEF), (OTHER, 4, UNDEF))
    assert got[1] == value
