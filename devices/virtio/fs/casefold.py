"""``ascii_casefold``: names match ignoring ASCII case, as crosvm does for Android guests.

A name-taking request (LOOKUP, CREATE, MKNOD, MKDIR, SYMLINK, LINK, UNLINK, RMDIR, RENAME) first
tries the name exactly as the guest spelled it; only when the host has no such entry is the
directory scanned for an entry equal to it after folding ``A-Z`` to ``a-z`` (bytes outside ASCII
are compared as they are).  The request then acts on that stored entry: LOOKUP finds it, MKDIR
of "Docs" beside "docs" answers EEXIST, CREATE without O_EXCL opens the existing file, UNLINK
and RENAME act on it.  READDIR lists names as the host stores them.

Collisions: a host directory may hold names that differ only in case ("Foo" and "foo", made on
the host, or before the option was on).  An exact spelling always reaches its own entry; any
other spelling reaches the bytewise smallest candidate (uppercase sorts first in ASCII: "FOO"
before "Foo" before "foo"), so the choice never depends on directory order.

Cost: a miss scans the directory (one open fd and a listing), so creating a new name in a
directory of N entries is O(N), as in crosvm.  Caching in the guest: a negative dentry is per
spelling, so ``negative_timeout`` must stay 0 with this option (FsOptions refuses the pair);
a positive dentry of one spelling survives a change made through another spelling for at most
``timeout`` seconds (use ``timeout: 0`` where that matters).
"""

from __future__ import annotations

import os


def fold(name: bytes) -> bytes:
    """ASCII case folding (``bytes.lower`` changes only A-Z)."""
    return name.lower()


def pick(name: bytes, candidates: list[bytes]) -> bytes | None:
    """The stored entry ``name`` reaches among ``candidates`` (a directory's names): ``name``
    itself, else the bytewise smallest name equal to it ignoring ASCII case, else None."""
    if name in candidates:
        return name
    want = fold(name)
    matches = [c for c in candidates if len(c) == len(name) and fold(c) == want]
    return min(matches) if matches else None


def stored_name(dir_fd: int, dir_path: str, name: bytes) -> bytes:
    """The name to use in directory ``dir_fd`` (an O_PATH fd; ``dir_path`` its /proc magic
    link) for the guest's ``name``: the name itself when it exists (or cannot be checked: the
    request then fails on its own), else its case-insensitive match, else the name (the request
    creates it or answers ENOENT)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return name
    except FileNotFoundError:
        pass
    except OSError:
        return name
    fd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)
    found = pick(name, names)
    return name if found is None else found
