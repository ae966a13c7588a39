"""Namespaces and the file-system view of a jailed device.

What each step is for:

* ``unshare(NEWNS|NEWPID|NEWIPC|NEWUTS|NEWNET)``: private mount table, process ids, SysV IPC,
  host name and network stack. NEWPID applies to the *children* of the caller, so the process
  that unshares forks once more and the grandchild, PID 1 of the new namespace, is the jailed
  device (``jail.py`` does that dance).
* ``make_mounts_slave``: the namespace's copy of the host mounts stops propagating *out* (our
  pivot_root, our proc mount and our unmounts never reach the host) but still receives the host's
  unmounts, so the device never keeps a host file system busy. virtiofsd does the same.
* ``open_private_proc``: the passthrough reopens inodes through ``/proc/self/fd/N``, and after
  pivot_root there is no /proc. A fresh procfs of the *new* PID namespace (it lists only the
  jailed processes), read-only, ``subset=pid`` (no /proc/sys, /proc/sysrq-trigger, ...), is
  mounted, opened as an O_PATH directory fd and immediately detached: the fd keeps it usable and
  a detached mount has no parent, so ``..`` from it leads nowhere.
* ``bind_root``: pivot_root needs the new root to be a mount point; the share is bind-mounted
  onto itself, and this jail's view of it gets ``nosuid,nodev,noexec`` (the existing flags, such
  as ``ro``, are kept), so even a bug cannot make the device open a device node planted in the
  share. The host's and the guest's view of the share are unchanged.
* ``pivot_into``: virtiofsd's ``pivot_root(".", ".")`` + ``umount2(".", MNT_DETACH)``, which
  needs no extra directory inside the share. Afterwards "/" is the share and the host tree is
  gone from this mount namespace altogether.
* ``chroot_into``: for hosts where pivot_root cannot work (a root on rootfs/initramfs). The host
  tree stays mounted but unreachable by path; leaving a chroot needs CAP_SYS_CHROOT (dropped) and
  a directory fd outside it (the jail closes every fd it was not asked to keep).
"""

from __future__ import annotations

import errno
import logging
import os

from . import _sys

logger = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: The namespaces a jailed fs device gets; a user namespace (CLONE_NEWUSER) only with uid/gid maps
#: (userns.py): without one the device creates files with the guest's uids unchanged on the host.
JAIL_NAMESPACES = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

SYS_pivot_root = 155

# statvfs f_flag bits -> the MS_ flag that keeps them on a bind remount
_ST_TO_MS = (
    (os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME),
)


def unshare(flags: int = JAIL_NAMESPACES) -> None:
    _sys.unshare(flags)


def make_mounts_slave() -> None:
    """Stop mount events from leaving this mount namespace (see the module docstring)."""
    _sys.mount(None, "/", None, MS_REC | MS_SLAVE)


def open_private_proc(mountpoint: str = "/proc") -> int:
    """A detached, read-only procfs of the caller's PID namespace, as an O_PATH directory fd.

    Must run in a new mount namespace (the mount covers `mountpoint` there only) by a process
    that is already inside the new PID namespace (procfs takes the mounter's namespace)."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
    try:
        _sys.mount("proc", mountpoint, "proc", flags, "subset=pid")
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # Kernels before 5.8 lack subset=pid: the rest of /proc stays visible, read-only.
        logger.warning("procfs subset=pid not supported; the jail keeps a full read-only /proc")
        _sys.mount("proc", mountpoint, "proc", flags)
    try:
        fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        _sys.umount2(mountpoint, MNT_DETACH)
    return fd


def bind_root(root: str) -> None:
    """Make `root` a mount point of its own (pivot_root requires one) and take nosuid, nodev and
    noexec for this namespace's view of it, keeping every flag it already had."""
    _sys.mount(root, root, None, MS_BIND | MS_REC)
    kept = 0
    f_flag = os.statvfs(root).f_flag
    for st_bit, ms_bit in _ST_TO_MS:
        if f_flag & st_bit:
            kept |= ms_bit
    _sys.mount(None, root, None,
               MS_BIND | MS_REMOUNT | kept | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def pivot_into(root: str) -> None:
    """Make `root` (a mount point, see bind_root) this namespace's "/", and detach the old root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)
    _sys.syscall(SYS_pivot_root, b".", b".", what="pivot_root")
    # The old root is now stacked on top of the new one at "/": detach it (and everything under
    # it, the whole host tree) from this namespace.
    _sys.umount2(".", MNT_DETACH)
    os.chdir("/")


def chroot_into(root: str) -> None:
    os.chdir(root)
    os.chroot(".")
    os.chdir("/")


def set_hostname(name: str) -> None:
    """Name the (new) UTS namespace, so a log line from inside says where it came from."""
    _sys.sethostname(name)
