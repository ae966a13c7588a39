"""Thin ctypes wrappers for the Linux *at syscalls the passthrough needs and `os` lacks.

Python's `os` module has no openat2, renameat2, getdents64, AT_EMPTY_PATH variants of
utimensat/fchownat/linkat, fallocate with a mode, or syncfs. Those are exactly the calls that let the
server act on an O_PATH fd without ever handing a path string to the kernel, which is what keeps
guest requests inside the shared directory. Every wrapper raises OSError with the real errno.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 syscall numbers (the VMM is x86_64-only).
SYS_getdents64 = 217
SYS_renameat2 = 316
SYS_openat2 = 437

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _raise_errno(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def _path(name: bytes | str) -> bytes:
    b = os.fsencode(name)
    if b"\0" in b:
        raise OSError(errno.EINVAL, "embedded NUL in name")
    return b


_openat2_missing = False


def openat2(dirfd: int, name: bytes, flags: int, mode: int = 0,
            resolve: int = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) -> int:
    """openat2(2) with `resolve` restrictions; falls back to openat(O_NOFOLLOW) on ENOSYS.

    The fallback is only as safe as the caller's name check (one component, no '..', no '/'),
    which every caller in this package performs first.
    """
    global _openat2_missing
    if not _openat2_missing:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
        fd = _libc.syscall(SYS_openat2, ctypes.c_int(dirfd), _path(name), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        e = ctypes.get_errno()
        if e != errno.ENOSYS:
            raise OSError(e, f"openat2: {os.strerror(e)}")
        _openat2_missing = True
    return os.open(_path(name), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    r = _libc.syscall(SYS_renameat2, ctypes.c_int(olddirfd), _path(oldname), ctypes.c_int(newdirfd),
                      _path(newname), ctypes.c_uint(flags))
    if r < 0:
        e = ctypes.get_errno()
        if e == errno.ENOSYS and flags == 0:
            os.rename(oldname, newname, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
            return
        raise OSError(e, f"renameat2: {os.strerror(e)}")


def linkat(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    if _libc.linkat(ctypes.c_int(olddirfd), _path(oldname), ctypes.c_int(newdirfd),
                    _path(newname), ctypes.c_int(flags)) != 0:
        _raise_errno("linkat")


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """Change owner of the inode an (O_PATH) fd refers to, without following symlinks.

    uid/gid of -1 leave that id unchanged.
    """
    if _libc.fchownat(ctypes.c_int(fd), b"", ctypes.c_uint32(uid & 0xFFFFFFFF),
                      ctypes.c_uint32(gid & 0xFFFFFFFF),
                      ctypes.c_int(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)) != 0:
        _raise_errno("fchownat")


def utimensat_empty(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Set times of the inode an (O_PATH) fd refers to. Each time is (sec, nsec) or
    (0, UTIME_NOW) / (0, UTIME_OMIT)."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(ctypes.c_int(fd), b"", ts,
                       ctypes.c_int(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)) != 0:
        _raise_errno("utimensat")


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise_errno("fallocate")


_libc.lseek.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
_libc.lseek.restype = ctypes.c_int64


def lseek(fd: int, offset: int, whence: int) -> int:
    """lseek(2) that never returns a negative offset.

    Some file systems answer SEEK_DATA/SEEK_HOLE near the 2**63 limit with a negative offset
    (tmpfs does). CPython 3.11's ``os.lseek`` then returns that value *with an OSError still
    pending*, which surfaces later as a SystemError inside unrelated code (it once wedged a table
    lock). Here the raw result is checked: -1 carries errno, any other negative value is
    EOVERFLOW ("the resulting offset cannot be represented").
    """
    r = _libc.lseek(fd, offset, whence)
    if r == -1:
        _raise_errno("lseek")
    if r < 0:
        raise OSError(errno.EOVERFLOW, f"lseek: the file system returned offset {r}")
    return r


_libc.fgetxattr.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.fgetxattr.restype = ctypes.c_ssize_t
_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.getxattr.restype = ctypes.c_ssize_t


def xattr_absent(target: int | str, name: bytes) -> bool:
    """True when ``target`` (an open fd, or a path followed to its inode) certainly has no xattr
    ``name``.  A size probe that raises nothing: it runs before every WRITE (a remapped file
    capability must go), where os.removexattr's ENODATA exception cost twice as much."""
    if isinstance(target, int):
        r = _libc.fgetxattr(target, name, None, 0)
    else:
        r = _libc.getxattr(_path(target), name, None, 0)
    return r < 0 and ctypes.get_errno() in (errno.ENODATA, errno.ENOTSUP)


def getdents64_raw(fd: int, bufsize: int) -> bytes:
    """One getdents64(2) call: the raw linux_dirent64 records (b"" at the end of the directory),
    read from the fd's current position, which advances past them."""
    buf = ctypes.create_string_buffer(bufsize)
    n = _libc.syscall(SYS_getdents64, ctypes.c_int(fd), buf, ctypes.c_uint(bufsize))
    if n < 0:
        _raise_errno("getdents64")
    if n > bufsize:
        raise OSError(errno.EIO, f"getdents64 returned {n} bytes for a {bufsize}-byte buffer")
    return buf.raw[:n]


def syncfs(fd: int) -> None:
    """syncfs(2): write back everything of the file system ``fd`` is on (not an O_PATH fd)."""
    if _libc.syncfs(ctypes.c_int(fd)) != 0:
        _raise_errno("syncfs")
