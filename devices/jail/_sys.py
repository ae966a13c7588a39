"""The few libc entry points the jail needs that Python's ``os`` lacks (3.11 has no unshare,
mount, pivot_root, prctl, capset or seccomp), each raising OSError with the real errno."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

libc = _libc


def raise_errno(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def checked(r: int, what: str) -> int:
    """libc convention: -1 (any negative for raw syscall()) means errno is set."""
    if r < 0:
        raise_errno(what)
    return r


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return checked(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def syscall(nr: int, *args: object, what: str = "") -> int:
    return checked(_libc.syscall(ctypes.c_long(nr), *args), what or f"syscall {nr}")


def _b(s: str | bytes | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    checked(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
            f"mount {fstype or source!s} on {target}")


def umount2(target: str, flags: int) -> None:
    checked(_libc.umount2(_b(target), flags), f"umount2 {target}")


def unshare(flags: int) -> None:
    checked(_libc.unshare(flags), f"unshare({flags:#x})")


def sethostname(name: str) -> None:
    b = name.encode()
    checked(_libc.sethostname(b, len(b)), "sethostname")


# prctl options (linux/prctl.h); checked against the header by tests/test_jail_abi.py
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_GET_DUMPABLE = 3
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
