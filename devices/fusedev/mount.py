"""Mounting a FUSE file system on the host: /dev/fuse plus mount(2), or fusermount3 when not root.

As root we open ``/dev/fuse`` and call mount(2) ourselves with the options the kernel's FUSE
needs (``fs/fuse/inode.c``: ``fd``, ``rootmode``, ``user_id`` and ``group_id`` are mandatory) plus
``default_permissions`` (the kernel checks mode bits against the caller, as the virtio-fs guest
driver always does) and ``allow_other`` (every local user sees the mount, as every guest process
sees a virtio-fs share).  Without root, the set-uid helper ``fusermount3`` (package fuse3) mounts
for us and passes the /dev/fuse fd back over a Unix socket (the ``_FUSE_COMMFD`` protocol of
libfuse); ``allow_other`` then needs ``user_allow_other`` in /etc/fuse.conf.

Unmounting is lazy (``MNT_DETACH`` / ``fusermount3 -u -z``): the mount disappears from the
namespace at once, and processes still inside it keep working until they leave.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
#: The mount's type as /proc/mounts and ``df -T`` show it (``fuse.<subtype>``).
SUBTYPE = "pyvmm"
FUSE_CONF = "/etc/fuse.conf"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(RuntimeError):
    """The file system could not be mounted (the message says why and what to do)."""


def _oserror(what: str, path: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what} {path}: {os.strerror(err)}", path)


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                   data.encode()) != 0:
        raise _oserror("mount", target)


def sys_umount2(target: str, flags: int) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        raise _oserror("umount", target)


def _user_allow_other() -> bool:
    try:
        with open(FUSE_CONF) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def _fsname_option(fsname: str) -> str:
    # Commas separate mount options and the kernel has no escape for them.
    return "fsname=" + fsname.replace(",", "_").replace("\\", "_")


@dataclass
class FuseMount:
    """A mounted FUSE file system: the /dev/fuse fd to serve and how to unmount it."""

    fd: int
    mountpoint: str
    method: str  # "mount" (mount(2) as root) or "fusermount3"
    mounted: bool = True

    def unmount(self) -> bool:
        """Detach the mount (lazily); True if it was still mounted and is now gone."""
        if not self.mounted:
            return False
        self.mounted = False
        if self.method == "mount":
            try:
                sys_umount2(self.mountpoint, MNT_DETACH)
            except OSError as e:
                if e.errno == errno.EINVAL:   # not a mount point any more: unmounted by hand
                    return False
                raise
            return True
        helper = shutil.which("fusermount3") or "fusermount3"
        r = subprocess.run([helper, "-u", "-z", "--", self.mountpoint], capture_output=True,
                           text=True)
        if r.returncode != 0:
            logger.warning("fusermount3 -u %s: %s", self.mountpoint, r.stderr.strip())
            return False
        return True

    def close(self) -> None:
        """Close /dev/fuse: the kernel aborts the connection (later requests fail ENOTCONN)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_mountpoint(mountpoint: str) -> str:
    """Absolute path of an existing directory to mount on (errors say what is wrong)."""
    path = os.path.abspath(mountpoint)
    try:
        st = os.stat(path)
    except OSError as e:
        raise MountError(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mountpoint} is not a directory")
    return path


def mount_fuse(mountpoint: str, fsname: str, *, allow_other: bool = True,
               nosuid: bool = True, nodev: bool = True) -> FuseMount:
    """Mount an (as yet unserved) FUSE file system on ``mountpoint``; returns its /dev/fuse fd.

    The caller must start serving the fd at once: the first access to the mount waits for the
    INIT reply.  Root mounts with mount(2); anyone else through fusermount3.
    """
    path = check_mountpoint(mountpoint)
    if os.geteuid() == 0:
        return _kernel_mount(path, fsname, allow_other=allow_other, nosuid=nosuid, nodev=nodev)
    helper = shutil.which("fusermount3")
    if helper is None:
        raise MountError("mounting without root needs fusermount3 (apt-get install fuse3), "
                         "or run as root")
    return _fusermount(helper, path, fsname, allow_other=allow_other and _user_allow_other())


def _kernel_mount(path: str, fsname: str, *, allow_other: bool, nosuid: bool,
                  nodev: bool) -> FuseMount:
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise MountError(f"cannot open {FUSE_DEVICE}: {e.strerror} (modprobe fuse?)") from None
    opts = [f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}", "default_permissions"]
    if allow_other:
        opts.append("allow_other")
    flags = (MS_NOSUID if nosuid else 0) | (MS_NODEV if nodev else 0)
    try:
        sys_mount(fsname, path, f"fuse.{SUBTYPE}", flags, ",".join(opts))
    except OSError as e:
        os.close(fd)
        raise MountError(f"mount -t fuse.{SUBTYPE} on {path}: {e.strerror}") from None
    logger.info("mounted %s on %s (fuse.%s, %s)", fsname, path, SUBTYPE, ",".join(opts[4:]))
    return FuseMount(fd, path, "mount")


def _fusermount(helper: str, path: str, fsname: str, *, allow_other: bool) -> FuseMount:
    opts = ["default_permissions", _fsname_option(fsname), f"subtype={SUBTYPE}", "nosuid",
            "nodev"]
    if allow_other:
        opts.append("allow_other")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([helper, "-o", ",".join(opts), "--", path], env=env,
                                pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True)
        theirs.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        _out, err = proc.communicate()
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        raise MountError(f"fusermount3 could not mount {path}: "
                         f"{(err or '').strip() or 'no fd received'}")
    fd = fds[0]
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)
    logger.info("mounted %s on %s with fusermount3 (%s)", fsname, path, ",".join(opts))
    return FuseMount(fd, path, "fusermount3")
