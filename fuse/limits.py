"""Limits on guest-supplied names, paths, xattrs and offsets, and the one check of each.

Both sides of the FileSystem interface apply these rules: the server before a request reaches the
filesystem, and a filesystem again for defence in depth (it may be driven by something other than
this server).  Keeping each rule here means the two sides cannot drift apart: a name the server
lets through is never refused by the filesystem with a different errno, or the other way round.

Which errno, and why (Linux is the reference for what a guest kernel and a local filesystem do):

* A name component is 1..``NAME_MAX`` (255) bytes without ``/`` or NUL.  Linux's FUSE client lets
  names up to 1024 bytes through (``FUSE_NAME_MAX``), but every Linux filesystem stops at 255, so
  a longer one is ``ENAMETOOLONG``, the answer a local filesystem gives.  User space can cause
  that legitimately, so it is a plain :class:`OSError`.
* ``.`` and ``..`` are ``EINVAL`` (crosvm's ``validate_path_component`` and virtiofsd do the same).
  The guest's VFS resolves them itself and never sends them to create, remove, rename or link;
  LOOKUP of them is sent only for NFS export (``FUSE_EXPORT_SUPPORT``), which the server checks.
* An xattr name is 1..``XATTR_NAME_MAX`` bytes; longer is ``ERANGE`` (what setxattr(2) says).
  Its value is at most ``XATTR_SIZE_MAX`` (``E2BIG``).  Unlike a path component it may contain
  ``/``.
* A symlink target is non-empty (``ENOENT``) and shorter than ``PATH_MAX`` (``ENAMETOOLONG``).
* File offsets and lengths fit a signed 64-bit ``loff_t`` (``EINVAL`` otherwise).

Everything the guest kernel itself would never send raises :class:`RequestError`, an OSError the
server also logs (rate-limited): it points at a broken or hostile guest.
"""

from __future__ import annotations

import errno
from typing import Any

#: Longest path component on Linux (``NAME_MAX``, linux/limits.h).
NAME_MAX = 255
#: Longest path including its NUL (linux/limits.h); bounds symlink targets.
PATH_MAX = 4096
#: Longest xattr name and value, and the longest listxattr result (linux/limits.h).
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
#: Largest file offset or length (``loff_t`` is a signed 64-bit integer).
OFFSET_MAX = (1 << 63) - 1

DOT_NAMES = (b".", b"..")


class RequestError(OSError):
    """A guest-supplied value broke a protocol rule: answered with ``-errno`` like any OSError.

    The server additionally logs ``strerror`` (the reason), rate-limited; a filesystem that
    calls the checks below just sees an ordinary OSError.
    """

    def __init__(self, err: int, why: str) -> None:
        super().__init__(err, why)


def check_name(name: Any, *, dots: bool = False) -> bytes:
    """One path component from the guest, as bytes; ``dots`` admits ``.`` and ``..``."""
    if type(name) is not bytes:
        if not isinstance(name, (bytes, bytearray, memoryview)):
            raise RequestError(errno.EINVAL, "name must be bytes")
        name = bytes(name)
    if not name or b"/" in name or b"\0" in name:
        raise RequestError(errno.EINVAL, f"invalid name {name[:64]!r}")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
    if not dots and (name == b"." or name == b".."):
        raise RequestError(errno.EINVAL, f"{name!r} is not a name an entry can have")
    return name


def check_symlink_target(target: Any) -> bytes:
    """A symlink's text: only stored, never followed by the host."""
    if not isinstance(target, (bytes, bytearray, memoryview)):
        raise RequestError(errno.EINVAL, "symlink target must be bytes")
    target = bytes(target)
    if not target:
        raise RequestError(errno.ENOENT, "empty symlink target")
    if b"\0" in target:
        raise RequestError(errno.EINVAL, "NUL in symlink target")
    if len(target) >= PATH_MAX:
        raise RequestError(errno.ENAMETOOLONG, f"symlink target of {len(target)} bytes")
    return target


def check_xattr_name(name: Any) -> bytes:
    """An extended attribute name ('/' is allowed: it is not a path)."""
    if not isinstance(name, (bytes, bytearray, memoryview)):
        raise RequestError(errno.EINVAL, "xattr name must be bytes")
    name = bytes(name)
    if not name or b"\0" in name:
        raise RequestError(errno.EINVAL, "empty xattr name or NUL in it")
    if len(name) > XATTR_NAME_MAX:
        raise RequestError(errno.ERANGE, f"xattr name of {len(name)} bytes")
    return name


def check_xattr_size(size: int) -> None:
    """The length of an xattr value being set."""
    if size > XATTR_SIZE_MAX:
        raise RequestError(errno.E2BIG, f"xattr value of {size} bytes")


def check_offset(*values: int) -> None:
    """Offsets and lengths taken from unsigned wire fields must fit ``loff_t``."""
    for v in values:
        if v > OFFSET_MAX:
            raise RequestError(errno.EINVAL, f"offset/length {v} exceeds loff_t")
