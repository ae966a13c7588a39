"""Helpers shared by the passthrough filesystem tests (which call PassthroughFs directly)."""

from __future__ import annotations

import pytest

from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse.filesystem import SetattrRequest


def make_fs(share, **kw) -> PassthroughFs:
    """A passthrough fs on `share`, initialised as after a guest INIT offering every flag."""
    fs = PassthroughFs(FsOptions(source=str(share), tag="t", **kw))
    fs.init(0xFFFFFFFF)
    return fs


def errno_of(fn, *args) -> int:
    """The errno of the OSError `fn(*args)` must raise."""
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def sreq(valid, *, fh=None, size=0, mode=0, uid=0, gid=0, atime_ns=0, mtime_ns=0,
         atime_now=False, mtime_now=False) -> SetattrRequest:
    """A SETATTR request with only the fields `valid` names meaning anything."""
    return SetattrRequest(valid=valid, fh=fh, size=size, mode=mode, uid=uid, gid=gid,
                          atime_ns=atime_ns, mtime_ns=mtime_ns, atime_now=atime_now,
                          mtime_now=mtime_now)
