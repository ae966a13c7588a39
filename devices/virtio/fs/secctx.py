"""``security_ctx``: may this host label new files with the guest's security context?

FUSE_SECURITY_CTX (FUSE 7.36) makes the guest append the LSM label (e.g. an SELinux context) of
each entry it creates to CREATE, MKNOD, MKDIR and SYMLINK.  A server applies it the way crosvm
does: it writes the label to ``/proc/thread-self/attr/fscreate`` before the creation, so the host
kernel labels the new inode atomically, and clears it afterwards.  That only works where an LSM
that labels files is active and lets the device write its fscreate attribute.

Where it does not, crosvm negotiates the feature anyway and the guest's files end up unlabelled;
here the option is refused when the device is configured (``FsOptions``), with the reason, so a
user who asked for labels never gets a share that silently drops them.  Where the host would
allow it the option is refused too, saying so: the parsing of the request extension
(``fuse_secctx_header``) is not implemented yet (README "Device options", issue 12).
"""

from __future__ import annotations

import errno
import os

#: The attribute a thread writes to choose the label of the files it creates next.
FSCREATE = "/proc/thread-self/attr/fscreate"


def _probe(path: str) -> str | None:
    """Why ``path`` cannot be used to label creations, or None when it can (read it and
    write the value back: a no-op for this thread's next creation)."""
    try:
        with open(path, "rb", buffering=0) as f:
            current = f.read()
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return (f"reading {path} fails with EINVAL: no security module that labels files "
                    "(SELinux, Smack) is active")
        return f"cannot read {path}: {os.strerror(exc.errno or errno.EIO)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, current or b"\0")
        finally:
            os.close(fd)
    except OSError as exc:
        return f"the host refuses writes to {path}: {os.strerror(exc.errno or errno.EIO)}"
    return None


def unsupported_reason(path: str = FSCREATE) -> str | None:
    """The one-line reason ``security_ctx: true`` is refused on this host (always a string
    today: see the module docstring)."""
    why = _probe(path)
    if why:
        return why
    return "the host could label files, but FUSE_SECURITY_CTX requests are not parsed yet"
