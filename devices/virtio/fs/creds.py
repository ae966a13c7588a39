"""Who the passthrough is when it creates an entry: the guest caller, with the device's own rights.

The device runs as root (it serves every uid of the guest), and the guest kernel has already
checked the caller's permissions (virtio-fs mounts with default_permissions, and the guest knows
the caller's supplementary groups, which FUSE 7.37 does not send).  So the host kernel must not
check again, but two results of a creation depend on who makes it and must be the guest caller's:

* **ownership**: a new entry belongs to the caller's uid, and to its gid unless the directory is
  set-group-ID (then the directory's group, and a new subdirectory inherits S_ISGID).  Creating
  as the caller makes the host kernel apply that rule itself, atomically: no window in which a
  host user sees a root-owned entry, nothing to chown afterwards (a chown would clear set-id
  bits and could fail after the entry exists).
* **mode**: the request's umask, and nothing else.  The umask is per process (fs_struct), so a
  serving thread first gets a private one with ``unshare(CLONE_FS)`` (virtiofsd does the same);
  the VMM's own umask (022 from a shell) then never reaches guest entries, and the umask of one
  request never leaks into the VMM's own files.

This is virtiofsd's and crosvm's approach (they switch the thread's euid/egid), done with
``setfsuid``/``setfsgid``, which change only the identity used for file-system access, per
thread (raw system calls: glibc broadcasts set*id calls to every thread, but not these).  The
kernel drops CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_MKNOD, ... from the effective set when
the fs uid leaves 0; :func:`creating_as` raises them again (``capset`` within the permitted set),
because each would make the host re-decide something the guest kernel decided with more
information: write access through a supplementary group (virtiofsd's EACCES, which needed FUSE
7.38's supplementary-group extension), S_ISGID on a file created in a set-group-ID directory (the
guest VFS already stripped it when the caller is not a member), device nodes made by a guest
process holding CAP_MKNOD.

Every other operation runs with the device's credentials: their results do not depend on the
caller's identity once the guest has checked its permissions (SETATTR carries the new owner
explicitly; set-id bits are killed on the guest's explicit request, see policy.py).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from devices.jail import capabilities
from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)
#: Every creation of a guest's uid fails the same way when the device lacks CAP_SETUID/SETGID.
_log = LogThrottle(logger)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 system call numbers (the VMM is x86_64-only).
SYS_setfsuid = 122
SYS_setfsgid = 123
SYS_unshare = 272
CLONE_FS = 0x00000200

#: setfsuid/setfsgid(-1) change nothing and return the current id: how success is checked.
_QUERY = 0xFFFFFFFF


def _syscall(what: str, nr: int, *args: object) -> int:
    r = _libc.syscall(nr, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


class _ThreadState(threading.local):
    private_fs = False


_thread = _ThreadState()


def prepare_thread() -> None:
    """Give the calling thread its own umask (and cwd and root: CLONE_FS is all three), once.

    Threads created by this one afterwards share its copy.  The main thread of a process that
    only embeds the passthrough (tests) is affected the same way, which is harmless: the umask
    is restored after each request, and nothing here changes the cwd or the root."""
    if _thread.private_fs:
        return
    _syscall("unshare(CLONE_FS)", SYS_unshare, ctypes.c_ulong(CLONE_FS))
    _thread.private_fs = True


def _set_fsid(nr: int, what: str, value: int) -> int:
    """Switch the fs uid or gid of this thread to ``value``; returns the previous one."""
    previous = _libc.syscall(nr, ctypes.c_uint32(value))
    current = _libc.syscall(nr, ctypes.c_uint32(_QUERY))
    if current != value:
        cap = capabilities.CAPS["SETUID" if nr == SYS_setfsuid else "SETGID"]
        if capabilities.get()[0] >> cap & 1:
            # Holding CAP_SETUID/CAP_SETGID, the only refusal is an id without a mapping in the
            # device's user namespace (idmap "userns", devices/jail/userns.py): what the kernel
            # answers a caller whose fs ids have no mapping, as IdMappedFs does.
            raise OSError(errno.EOVERFLOW, f"{what}({value}): no host id in the user namespace")
        _log.warn("%s(%d) refused (still %d): the device needs CAP_SETUID and CAP_SETGID to "
                  "create entries for guest users", what, value, current)
        raise OSError(errno.EPERM, f"{what}({value}) refused (still {current})")
    return previous


@contextmanager
def creating_as(uid: int, gid: int, umask: int, switch: bool) -> Iterator[None]:
    """Run the block as a creation by ``uid``/``gid`` under ``umask`` (see the module docstring).

    ``switch`` False (the device does not run as root) only applies the umask: the entry then
    belongs to the device's user, the only owner it can give."""
    prepare_thread()
    old_umask = os.umask(umask & 0o777)
    try:
        if not switch or (uid == 0 and gid == 0):
            yield
            return
        if uid == _QUERY or gid == _QUERY:
            raise OSError(errno.EINVAL, "uid or gid -1")
        saved = capabilities.get()   # (effective, permitted, inheritable)
        old_gid = _set_fsid(SYS_setfsgid, "setfsgid", gid)
        try:
            old_uid = _set_fsid(SYS_setfsuid, "setfsuid", uid)
            try:
                capabilities.set_current(*saved)  # what the fs uid change took from the effective set
                yield
            finally:
                _libc.syscall(SYS_setfsuid, ctypes.c_uint32(old_uid))
        finally:
            _libc.syscall(SYS_setfsgid, ctypes.c_uint32(old_gid))
            # Back at the old fs uid the kernel re-raised the file-system capabilities that are
            # permitted; that is the effective set of before unless it was smaller.
            if saved[0] != saved[1]:
                capabilities.set_current(*saved)
    finally:
        os.umask(old_umask)
