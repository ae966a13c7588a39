"""fuse.limits: the one definition of each check on guest-supplied names, xattrs and offsets.

The server and the passthrough both call these, so what is tested here is the errno the guest gets
from either side (tests/test_passthrough_escape.py and test_fuse_server.py check both ends).
"""

from __future__ import annotations

import errno

import pytest

from fuse.limits import (
    NAME_MAX,
    OFFSET_MAX,
    PATH_MAX,
    XATTR_NAME_MAX,
    XATTR_SIZE_MAX,
    RequestError,
    check_name,
    check_offset,
    check_symlink_target,
    check_xattr_name,
    check_xattr_size,
)


def errno_of(fn, *args, **kw) -> tuple[int, bool]:
    """(errno, whether it is a logged RequestError)."""
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    return ei.value.errno, isinstance(ei.value, RequestError)


def test_linux_values() -> None:
    assert (NAME_MAX, PATH_MAX, XATTR_NAME_MAX, XATTR_SIZE_MAX) == (255, 4096, 255, 65536)
    assert OFFSET_MAX == 2**63 - 1


def test_names() -> None:
    assert check_name(b"a") == b"a"
    assert check_name(bytearray(b"x" * NAME_MAX)) == b"x" * NAME_MAX
    for bad in (b"", b"a/b", b"/", b"a\0b", "str", None):
        assert errno_of(check_name, bad) == (errno.EINVAL, True), bad
    # user space can ask for a long name legitimately: plain ENAMETOOLONG, not logged
    assert errno_of(check_name, b"x" * (NAME_MAX + 1)) == (errno.ENAMETOOLONG, False)
    for dot in (b".", b".."):
        assert errno_of(check_name, dot) == (errno.EINVAL, True)
        assert check_name(dot, dots=True) == dot


def test_symlink_targets() -> None:
    assert check_symlink_target(b"../x/y") == b"../x/y"
    assert check_symlink_target(b"t" * (PATH_MAX - 1)) == b"t" * (PATH_MAX - 1)
    assert errno_of(check_symlink_target, b"") == (errno.ENOENT, True)
    assert errno_of(check_symlink_target, b"a\0b") == (errno.EINVAL, True)
    assert errno_of(check_symlink_target, b"t" * PATH_MAX) == (errno.ENAMETOOLONG, True)
    assert errno_of(check_symlink_target, 5) == (errno.EINVAL, True)


def test_xattr_names_and_sizes() -> None:
    assert check_xattr_name(b"user.a/b") == b"user.a/b"  # '/' is fine: not a path
    assert check_xattr_name(b"u" * XATTR_NAME_MAX) == b"u" * XATTR_NAME_MAX
    assert errno_of(check_xattr_name, b"u" * (XATTR_NAME_MAX + 1)) == (errno.ERANGE, True)
    for bad in (b"", b"user.\0x", None):
        assert errno_of(check_xattr_name, bad) == (errno.EINVAL, True)
    check_xattr_size(XATTR_SIZE_MAX)
    assert errno_of(check_xattr_size, XATTR_SIZE_MAX + 1) == (errno.E2BIG, True)


def test_offsets() -> None:
    check_offset(0, OFFSET_MAX)
    assert errno_of(check_offset, 1, OFFSET_MAX + 1) == (errno.EINVAL, True)
