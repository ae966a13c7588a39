"""What a guest may leave on the host: set-id bits, device nodes and xattr names (issue 11).

The passthrough runs as root, so without these rules a guest could plant, in a directory the host
uses, exactly the things a host's own kernel treats as privilege: a set-uid root executable, a
device node, a file capability (``security.capability``), overlayfs metadata (``trusted.*``) or an
ACL.  Each rule has a safe default and an option that restores exact POSIX behaviour for a trusted
guest (``FsOptions``: ``allow_setid``, ``allow_mknod``, ``xattr_policy``, ``allow_selinux_xattr``).
The rules are pure functions of the request and the options; the passthrough applies them.

**Set-id bits** (``allow_setid: false``): CREATE, MKNOD, MKDIR and SETATTR(mode) never leave
S_ISUID on anything, nor S_ISGID on anything but a directory.  The bits are stripped, the request
succeeds, and the reply reports the mode the host really has, so the guest sees the truth (a
`chmod 4755` reads back 0755; refusing with EPERM instead would break every package manager that
installs a set-uid program).  S_ISGID on a *directory* is kept: it only makes new entries inherit
the directory's group (POSIX), which grants nobody a privilege, and the host kernel propagates it
to new subdirectories itself.

**Kill on write** (FUSE_HANDLE_KILLPRIV_V2, always on): the guest no longer checks set-id bits
before each WRITE (it used to send GETXATTR(security.capability) first); it flags the requests of
callers without CAP_FSETID instead, and the server clears the bits a local file system would:
S_ISUID, and S_ISGID when the group may execute (:func:`kill_bits`; fuse.h and the VFS's
``should_remove_suid``).  The host kernel removes a real ``security.capability`` on every write
itself; a remapped one is removed by the passthrough.

**Device nodes** (``allow_mknod: false``): MKNOD of a character or block device, and RENAME with
RENAME_WHITEOUT (which makes a 0:0 character device at the old name), answer EPERM, what the host
kernel answers a caller without CAP_MKNOD.  With the option the guest's ``rdev`` (the kernel's
32-bit ``new_encode_dev`` form) is decoded and the node is made.

**Xattr names** (``xattr_policy``): ``security.*``, ``trusted.*`` and ``system.*`` (POSIX ACLs,
NFSv4 ACLs) change what the host kernel enforces or trusts; ``user.*`` does not.  See
:class:`XattrMap`.
"""

from __future__ import annotations

import errno
import os
import stat

#: Set-uid and set-gid.
SETID_BITS = stat.S_ISUID | stat.S_ISGID


def permitted_mode(mode: int, is_dir: bool, allow_setid: bool) -> int:
    """The permission bits (``0o7777``) a new entry or a chmod may leave on the host."""
    bits = mode & 0o7777
    if not allow_setid:
        bits &= ~(stat.S_ISUID if is_dir else SETID_BITS)
    return bits


def kill_bits(st_mode: int) -> int:
    """The set-id bits a write, truncate or chown clears from a file of mode ``st_mode`` when the
    caller lacks CAP_FSETID: S_ISUID, and S_ISGID only together with S_IXGRP (without group
    execute it is the old mandatory-locking mark, which Linux leaves alone).  0 for anything but
    a regular file."""
    if not stat.S_ISREG(st_mode):
        return 0
    kill = st_mode & stat.S_ISUID
    if st_mode & (stat.S_ISGID | stat.S_IXGRP) == (stat.S_ISGID | stat.S_IXGRP):
        kill |= stat.S_ISGID
    return kill


def decode_rdev(rdev: int) -> int:
    """The host dev_t of the guest's ``rdev``: the kernel's 32-bit ``new_encode_dev`` form (12
    bits of major, 20 of minor) that FUSE carries in fuse_mknod_in (include/linux/kdev_t.h)."""
    if not 0 <= rdev <= 0xFFFFFFFF:
        raise OSError(errno.EINVAL, f"rdev {rdev:#x} is not a 32-bit device number")
    major = (rdev >> 8) & 0xFFF
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


# ------------------------------------------------------------------------------------------
# Extended attributes

#: Where remapped names live on the host.  crosvm's ``rewrite_security_xattrs`` stores
#: ``security.X`` as ``user.virtiofs.security.X``; the same prefix keeps a share usable by both.
PRIVATE_PREFIX = b"user.virtiofs."
#: Namespaces whose xattrs the host kernel enforces or trusts.
PROTECTED_PREFIXES = (b"security.", b"trusted.", b"system.")
SELINUX = b"security.selinux"
#: POSIX ACLs.  With ``posix_acl`` (FUSE_POSIX_ACL) the guest kernel enforces them and leaves
#: everything an ACL changes besides the check itself to the server: the mode's group bits
#: following the ACL mask on SETXATTR, the mask following a chmod, a new entry inheriting its
#: directory's default ACL, the umask skipped under a default ACL.  The host kernel does all of
#: that for a real ACL, so under ``remap`` these two names go to the host as they are (never
#: under ``refuse``; ``passthrough`` passes everything).  That lets the guest change what the
#: host enforces no more than chmod already does: an ACL grants read/write/execute on one inode
#: to named users and groups, a mode grants them to everyone.  Remapped instead, guest and host
#: would disagree on every mode an ACL touches.
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
CAPABILITY = b"security.capability"


class XattrMap:
    """Guest xattr names <-> host xattr names under one ``xattr_policy``.

    A name is *reserved* when it is in a protected namespace (``security.``, ``trusted.``,
    ``system.``; ``security.selinux`` only unless ``allow_selinux_xattr``) or starts with the
    private prefix ``user.virtiofs.``.  Reserved names never reach the host as they are:

    * ``remap`` (default): stored as ``user.virtiofs.<name>``.  The guest reads back and lists
      exactly what it set (its own kernel then enforces its file capabilities and its
      overlayfs works inside the guest), the host kernel ignores ``user.*``.  The guest's own
      ``user.virtiofs.X`` is stored as ``user.virtiofs.user.virtiofs.X``, so the mapping is a
      bijection and a guest can neither forge nor read a remapped name by spelling it.  The
      host's own reserved xattrs (e.g. its SELinux labels) are hidden from the guest.  Limits:
      a remapped name is 14 bytes longer (ERANGE beyond 255), and the host allows ``user.*``
      only on regular files and directories (EPERM elsewhere, as for any ``user.*`` name).
    * ``refuse``: set/remove answer EPERM, get answers ENODATA (so the guest kernel's own
      lookups, e.g. of ``security.capability`` at exec, see "none"), list hides them.
    * ``passthrough``: every name goes to the host unchanged (the behaviour before the policy;
      a guest can then grant file capabilities on the host).
    """

    def __init__(self, policy: str, allow_selinux: bool = False, acl: bool = False) -> None:
        if policy not in ("remap", "refuse", "passthrough"):
            raise ValueError(f"unknown xattr policy {policy!r}")
        self.policy = policy
        self.allow_selinux = allow_selinux
        #: posix_acl: the POSIX ACL names reach the host as they are under ``remap`` (ACL_NAMES).
        self.acl = acl and policy == "remap"
        #: The host name of the guest's security.capability when the host does not manage it.
        self.remapped_capability = PRIVATE_PREFIX + CAPABILITY if policy == "remap" else None

    def reserved(self, name: bytes) -> bool:
        if name.startswith(PRIVATE_PREFIX):
            return True
        if self.acl and name in ACL_NAMES:
            return False
        if name.startswith(PROTECTED_PREFIXES):
            return not (self.allow_selinux and name == SELINUX)
        return False

    def to_host(self, name: bytes) -> bytes | None:
        """The host name for a guest name; None when the policy refuses it."""
        if self.policy == "passthrough":
            return name
        if name in PROTECTED_PREFIXES:
            # An empty name within a namespace: what a local file system answers.
            raise OSError(errno.EINVAL, f"empty xattr name in {name!r}")
        if not self.reserved(name):
            return name
        return PRIVATE_PREFIX + name if self.policy == "remap" else None

    def to_guest(self, host_name: bytes) -> bytes | None:
        """The guest's name for a host name; None when the guest must not see it."""
        if self.policy == "passthrough":
            return host_name
        if self.policy == "remap" and host_name.startswith(PRIVATE_PREFIX):
            name = host_name[len(PRIVATE_PREFIX):]
            # Only names to_host() produces map back: one guest name per host name.
            return name if self.reserved(name) and name not in PROTECTED_PREFIXES else None
        return None if self.reserved(host_name) else host_name

    def guest_list(self, host_names: list[bytes]) -> bytes:
        """A LISTXATTR reply body: the guest's names, each NUL-terminated."""
        out = []
        for host_name in host_names:
            name = self.to_guest(host_name)
            if name is not None:
                out.append(name + b"\0")
        return b"".join(out)
