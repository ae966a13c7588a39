"""FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING: the DAX window requests, decoded and checked.

These two opcodes exist only for virtio-fs devices with a shared memory window (virtio 1.2
sec. 5.11.6): the guest asks the device to map part of a file at an offset of the window, and to
unmap ranges again.  What this module checks is what the wire can get wrong whatever the window
looks like -- flags outside the defined bits, a REMOVEMAPPING count the request does not carry or
above FUSE_REMOVEMAPPING_MAX_ENTRY, lengths that overflow 64 bits.  The window itself (its size,
its alignment, what is mapped where) is the filesystem's to check: see
``devices/virtio/fs/dax.py``.  Handlers have the op table's signature (``fuse.ops``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from . import abi
from .filesystem import Context
from .io import Reader, Writer
from .limits import RequestError

if TYPE_CHECKING:
    from .server import Server

_U64 = (1 << 64) - 1
_SETUP_FLAGS = abi.FUSE_SETUPMAPPING_FLAG_READ | abi.FUSE_SETUPMAPPING_FLAG_WRITE
_ONE = abi.REMOVEMAPPING_ONE.struct


def setupmapping(s: Server, nodeid: int, ctx: Context, a: Any, names: list[bytes],
                 r: Reader, w: Writer) -> None:
    if a.flags & ~_SETUP_FLAGS:
        raise RequestError(errno.EINVAL, f"SETUPMAPPING flags {a.flags:#x}")
    if a.len == 0 or a.foffset + a.len > _U64 or a.moffset + a.len > _U64:
        raise RequestError(errno.EINVAL, f"SETUPMAPPING len {a.len} at foffset {a.foffset}"
                                         f" moffset {a.moffset}")
    s.fs.setupmapping(ctx, nodeid, a.fh, a.foffset, a.len, a.flags, a.moffset)


def removemapping(s: Server, nodeid: int, ctx: Context, a: Any, names: list[bytes],
                  r: Reader, w: Writer) -> None:
    count = a.count
    if not 0 < count <= abi.FUSE_REMOVEMAPPING_MAX_ENTRY:
        raise RequestError(errno.EINVAL, f"REMOVEMAPPING count {count}")
    need = count * _ONE.size
    if r.remaining() != need:
        raise RequestError(errno.EINVAL, f"REMOVEMAPPING of {count} entries carries"
                                         f" {r.remaining()} bytes, not {need}")
    raw = r.read(need)
    ranges = [_ONE.unpack_from(raw, i * _ONE.size) for i in range(count)]
    for moffset, length in ranges:
        if moffset + length > _U64:
            raise RequestError(errno.EINVAL, f"REMOVEMAPPING {length} bytes at {moffset}")
    s.fs.removemapping(ctx, ranges)
