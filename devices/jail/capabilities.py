"""Capabilities of a jailed device: drop everything but the few the passthrough needs.

A jailed device stays uid 0 (it must create files owned by the guest's uids on the host), so what
it may do is decided by its capabilities, not its uid. (In a user namespace, userns.py, it is the
namespace's uid 0, a mapped host user, and the same capabilities act only on inodes whose owner
and group are mapped.) ``drop_to`` leaves the permitted and
effective sets equal to the kept set, empties the inheritable and ambient sets, removes every
other capability from the bounding set (so nothing, not even an exec of a set-uid or file-cap
binary, can bring one back) and locks the securebits that make uid 0 special:

* SECBIT_NOROOT (+ locked): exec as uid 0 grants no capabilities.
* SECBIT_NO_CAP_AMBIENT_RAISE (+ locked): the ambient set stays empty.
* SECBIT_KEEP_CAPS off (+ locked) and SECBIT_NO_SETUID_FIXUP off (+ locked): a switch of the
  device's uid would drop its capabilities as for any process.  (The fs-uid switch of a
  creation drops the file-system ones; creds.py raises them again, within the permitted set.)

Why each capability of the default set (``FS_DEVICE_CAPS``) is kept:

========== ===========================================================================
CHOWN      SETATTR uid/gid (the guest's chown)
DAC_OVERRIDE  read/write/search any file in the share whatever its mode (the guest kernel
           already checked the caller's permissions: default_permissions)
FOWNER     chmod, utimes, xattrs and O_NOATIME on files the device does not own
FSETID     keep set-id bits where the guest asked for them (chmod g+s of a file whose group
           the device is not in would otherwise silently lose S_ISGID)
SETUID, SETGID  a creation runs with the guest caller's fs uid/gid (setfsuid/setfsgid,
           devices/virtio/fs/creds.py), so new entries get the caller's ownership
MKNOD      only with ``allow_mknod``: device nodes in the share
SETFCAP    only with ``allow_setfcap``: the ``security.capability`` xattr
========== ===========================================================================

DAC_READ_SEARCH is deliberately *not* kept although ``linkat(fd, "", AT_EMPTY_PATH)`` wants
it: it also grants ``open_by_handle_at``, the classic container escape, and the passthrough
falls back to linking through ``/proc/self/fd/N``. SYS_ADMIN, SYS_CHROOT, SETPCAP and the rest are
gone once the jail is set up.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterable

from . import _sys

#: Capability numbers (linux/capability.h); tests/test_jail_abi.py checks them against gcc.
CAPS: dict[str, int] = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

FS_DEVICE_CAPS: frozenset[str] = frozenset(
    {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETGID", "SETUID"})

SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

#: The securebits a jailed device runs with (see the module docstring).
JAIL_SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED
                   | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE
                   | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_capget = 125
SYS_capset = 126


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def mask_of(names: Iterable[str]) -> int:
    """Bit mask of capability names ("CHOWN" or "CAP_CHOWN"); an unknown name is a ValueError."""
    m = 0
    for n in names:
        key = n.upper().removeprefix("CAP_")
        if key not in CAPS:
            raise ValueError(f"unknown capability {n!r}")
        m |= 1 << CAPS[key]
    return m


def names_of(mask: int) -> list[str]:
    return [n for n, b in sorted(CAPS.items(), key=lambda kv: kv[1]) if mask >> b & 1]


def get() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _sys.syscall(SYS_capget, ctypes.byref(hdr), data, what="capget")
    def join(field: str) -> int:
        return getattr(data[0], field) | getattr(data[1], field) << 32
    return join("effective"), join("permitted"), join("inheritable")


def set_current(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of the calling thread (masks as :func:`get` returns them); the kernel refuses
    anything above the permitted set."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = effective >> (32 * i) & 0xFFFFFFFF
        data[i].permitted = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].inheritable = inheritable >> (32 * i) & 0xFFFFFFFF
    _sys.syscall(SYS_capset, ctypes.byref(hdr), data, what="capset")


def last_cap() -> int:
    """The highest capability the running kernel knows (PR_CAPBSET_READ says EINVAL above)."""
    cap = 0
    while cap < 64:
        try:
            _sys.prctl(_sys.PR_CAPBSET_READ, cap + 1)
        except OSError as e:
            if e.errno == errno.EINVAL:
                break
            raise
        cap += 1
    return cap


def bounding_set() -> int:
    m = 0
    for cap in range(last_cap() + 1):
        if _sys.prctl(_sys.PR_CAPBSET_READ, cap):
            m |= 1 << cap
    return m


def drop_to(keep: int) -> int:
    """Reduce the calling thread to the capabilities in mask `keep` (see the module docstring).

    Needs CAP_SETPCAP, so it runs while the jail still holds everything. Capabilities in `keep`
    the process does not have are silently not gained; returns the mask actually kept. Threads
    share nothing here: call it before starting any."""
    _eff, permitted, _inh = get()
    keep &= permitted
    _sys.prctl(_sys.PR_SET_SECUREBITS, JAIL_SECUREBITS)
    for cap in range(last_cap() + 1):
        if not keep >> cap & 1:
            _sys.prctl(_sys.PR_CAPBSET_DROP, cap)
    _sys.prctl(_sys.PR_CAP_AMBIENT, _sys.PR_CAP_AMBIENT_CLEAR_ALL)
    set_current(keep, keep, 0)
    return keep
