"""FUSE wire ABI from ``linux/fuse.h``: opcodes, flags and struct layouts.

Every struct is described exactly once, in :data:`STRUCT_FIELDS` (name -> ordered fields with
``struct`` format characters).  Everything else -- the little-endian :class:`struct.Struct`, the
namedtuple type, field offsets and sizes -- is derived from that table, so a layout can never
disagree with itself.  ``tests/test_fuse_abi.py`` compiles a C probe of the host's
``/usr/include/linux/fuse.h`` and checks every size and offset against the table.

Field specs:

* one ``struct`` scalar char (``"B" "H" "I" "i" "Q" "q"``);
* ``"<N><c>"`` for a fixed array (``"11I"``), unpacked as a tuple;
* the name of another struct in the table for a nested struct, unpacked as its namedtuple;
* ``"[]"`` for a C flexible array member (``char name[]``): it has an offset but no size, and is
  neither packed nor unpacked (variable-length data follows the fixed part on the wire).

The guest is Linux 6.1 (FUSE 7.37); the host header is 7.38, whose only change visible here is that
the in-header ``padding`` became ``total_extlen``/``padding``.
"""

from __future__ import annotations

import collections
import enum
import re
import struct
from typing import Any

# --------------------------------------------------------------------------------------------
# Versions and misc constants

FUSE_KERNEL_VERSION = 7
#: Highest minor this implementation speaks (Linux 6.1 = 7.37). 7.38 only adds request
#: extensions (``total_extlen``) that a 7.37 session never carries.
FUSE_KERNEL_MINOR_VERSION = 37
#: Oldest minor accepted in INIT (Linux 5.4-era virtio-fs); older guests get EPROTO.
FUSE_MIN_MINOR_VERSION = 31
FUSE_ROOT_ID = 1
FUSE_MIN_READ_BUFFER = 8192

FUSE_COMPAT_ENTRY_OUT_SIZE = 120
FUSE_COMPAT_ATTR_OUT_SIZE = 96
FUSE_COMPAT_MKNOD_IN_SIZE = 8
FUSE_COMPAT_WRITE_IN_SIZE = 24
FUSE_COMPAT_STATFS_SIZE = 48
FUSE_COMPAT_SETXATTR_IN_SIZE = 8
FUSE_COMPAT_INIT_OUT_SIZE = 8
FUSE_COMPAT_22_INIT_OUT_SIZE = 24
#: Size of ``fuse_init_in`` before 7.36 added ``flags2`` (kernels < 5.17 send only this much).
FUSE_COMPAT_INIT_IN_SIZE = 16

#: Kernel-side limit on a name in a dirent (``FUSE_NAME_MAX`` in fs/fuse/fuse_i.h).  The Linux
#: limits on names, paths and xattrs (linux/limits.h) are in fuse.limits with their checks.
FUSE_NAME_MAX = 1024

# --------------------------------------------------------------------------------------------
# Opcodes


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``; member names are the UAPI names without the ``FUSE_`` prefix."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


# The UAPI spellings (FUSE_LOOKUP, ...) as module constants, for code that greps the header.
for _op in Opcode:
    globals()["FUSE_" + _op.name] = _op
del _op
CUSE_INIT = 4096
CUSE_INIT_BSWAP_RESERVED = 1048576
FUSE_INIT_BSWAP_RESERVED = 436207616

#: Opcodes the kernel sends without waiting for a reply (no writable part in the chain).
NO_REPLY_OPCODES = frozenset(
    {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.NOTIFY_REPLY}
)

# --------------------------------------------------------------------------------------------
# Flags

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# INIT flags (bits 32..63 travel in flags2)
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_HAS_EXPIRE_ONLY = 1 << 35

#: Every INIT flag by name (without FUSE_), for reports of what a session negotiated.
INIT_FLAGS = {name: globals()["FUSE_" + name] for name in (
    "ASYNC_READ", "POSIX_LOCKS", "FILE_OPS", "ATOMIC_O_TRUNC", "EXPORT_SUPPORT", "BIG_WRITES",
    "DONT_MASK", "SPLICE_WRITE", "SPLICE_MOVE", "SPLICE_READ", "FLOCK_LOCKS", "HAS_IOCTL_DIR",
    "AUTO_INVAL_DATA", "DO_READDIRPLUS", "READDIRPLUS_AUTO", "ASYNC_DIO", "WRITEBACK_CACHE",
    "NO_OPEN_SUPPORT", "PARALLEL_DIROPS", "HANDLE_KILLPRIV", "POSIX_ACL", "ABORT_ERROR",
    "MAX_PAGES", "CACHE_SYMLINKS", "NO_OPENDIR_SUPPORT", "EXPLICIT_INVAL_DATA", "MAP_ALIGNMENT",
    "SUBMOUNTS", "HANDLE_KILLPRIV_V2", "SETXATTR_EXT", "INIT_EXT", "INIT_RESERVED", "SECURITY_CTX",
    "HAS_INODE_DAX", "HAS_EXPIRE_ONLY",
)}


def init_flag_names(flags: int) -> list[str]:
    """The names of the INIT flags set in ``flags``, lowest bit first."""
    return [name for name, bit in sorted(INIT_FLAGS.items(), key=lambda kv: kv[1])
            if flags & bit]

# fuse_release_in.release_flags
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
# fuse_getattr_in.getattr_flags
FUSE_GETATTR_FH = 1 << 0
# fuse_lk_in.lk_flags
FUSE_LK_FLOCK = 1 << 0
# fuse_write_in.write_flags
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_WRITE_KILL_PRIV = FUSE_WRITE_KILL_SUIDGID
# fuse_read_in.read_flags
FUSE_READ_LOCKOWNER = 1 << 1
# fuse_fsync_in.fsync_flags
FUSE_FSYNC_FDATASYNC = 1 << 0
# fuse_attr.flags
FUSE_ATTR_SUBMOUNT = 1 << 0
FUSE_ATTR_DAX = 1 << 1

# fuse_setupmapping_in.flags
FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ = 1 << 1
#: Entries one FUSE_REMOVEMAPPING may carry (PAGE_SIZE / sizeof(fuse_removemapping_one)).
FUSE_REMOVEMAPPING_MAX_ENTRY = 4096 // 16
# fuse_open_in.open_flags / fuse_create_in.open_flags
FUSE_OPEN_KILL_SUIDGID = 1 << 0
# fuse_setxattr_in.setxattr_flags
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0

# fuse_ioctl_in.flags (ioctl is not served; listed for completeness of the header families)
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FUSE_IOCTL_32BIT = 1 << 3
FUSE_IOCTL_DIR = 1 << 4
FUSE_IOCTL_COMPAT_X32 = 1 << 5
FUSE_IOCTL_MAX_IOV = 256
# fuse_poll_in.flags
FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0
# fuse_notify_inval_entry_out.flags
FUSE_EXPIRE_ONLY = 1 << 0

# renameat2 flags (linux/fs.h), carried in fuse_rename2_in.flags
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# d_type values carried in fuse_dirent.type (dirent.h)
DT_UNKNOWN = 0
DT_FIFO = 1
DT_CHR = 2
DT_DIR = 4
DT_BLK = 6
DT_REG = 8
DT_LNK = 10
DT_SOCK = 12
DT_WHT = 14

# --------------------------------------------------------------------------------------------
# Struct table: the single source of truth for wire layouts.

STRUCT_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "fuse_in_header": (
        ("len", "I"), ("opcode", "I"), ("unique", "Q"), ("nodeid", "Q"), ("uid", "I"),
        ("gid", "I"), ("pid", "I"), ("total_extlen", "H"), ("padding", "H"),
    ),
    "fuse_out_header": (("len", "I"), ("error", "i"), ("unique", "Q")),
    "fuse_attr": (
        ("ino", "Q"), ("size", "Q"), ("blocks", "Q"), ("atime", "Q"), ("mtime", "Q"),
        ("ctime", "Q"), ("atimensec", "I"), ("mtimensec", "I"), ("ctimensec", "I"),
        ("mode", "I"), ("nlink", "I"), ("uid", "I"), ("gid", "I"), ("rdev", "I"),
        ("blksize", "I"), ("flags", "I"),
    ),
    "fuse_kstatfs": (
        ("blocks", "Q"), ("bfree", "Q"), ("bavail", "Q"), ("files", "Q"), ("ffree", "Q"),
        ("bsize", "I"), ("namelen", "I"), ("frsize", "I"), ("padding", "I"), ("spare", "6I"),
    ),
    "fuse_entry_out": (
        ("nodeid", "Q"), ("generation", "Q"), ("entry_valid", "Q"), ("attr_valid", "Q"),
        ("entry_valid_nsec", "I"), ("attr_valid_nsec", "I"), ("attr", "fuse_attr"),
    ),
    "fuse_forget_in": (("nlookup", "Q"),),
    "fuse_forget_one": (("nodeid", "Q"), ("nlookup", "Q")),
    "fuse_batch_forget_in": (("count", "I"), ("dummy", "I")),
    "fuse_getattr_in": (("getattr_flags", "I"), ("dummy", "I"), ("fh", "Q")),
    "fuse_attr_out": (
        ("attr_valid", "Q"), ("attr_valid_nsec", "I"), ("dummy", "I"), ("attr", "fuse_attr"),
    ),
    "fuse_mknod_in": (("mode", "I"), ("rdev", "I"), ("umask", "I"), ("padding", "I")),
    "fuse_mkdir_in": (("mode", "I"), ("umask", "I")),
    "fuse_rename_in": (("newdir", "Q"),),
    "fuse_rename2_in": (("newdir", "Q"), ("flags", "I"), ("padding", "I")),
    "fuse_link_in": (("oldnodeid", "Q"),),
    "fuse_setattr_in": (
        ("valid", "I"), ("padding", "I"), ("fh", "Q"), ("size", "Q"), ("lock_owner", "Q"),
        ("atime", "Q"), ("mtime", "Q"), ("ctime", "Q"), ("atimensec", "I"),
        ("mtimensec", "I"), ("ctimensec", "I"), ("mode", "I"), ("unused4", "I"),
        ("uid", "I"), ("gid", "I"), ("unused5", "I"),
    ),
    "fuse_open_in": (("flags", "I"), ("open_flags", "I")),
    "fuse_create_in": (("flags", "I"), ("mode", "I"), ("umask", "I"), ("open_flags", "I")),
    "fuse_open_out": (("fh", "Q"), ("open_flags", "I"), ("padding", "I")),
    "fuse_release_in": (
        ("fh", "Q"), ("flags", "I"), ("release_flags", "I"), ("lock_owner", "Q"),
    ),
    "fuse_flush_in": (("fh", "Q"), ("unused", "I"), ("padding", "I"), ("lock_owner", "Q")),
    "fuse_read_in": (
        ("fh", "Q"), ("offset", "Q"), ("size", "I"), ("read_flags", "I"), ("lock_owner", "Q"),
        ("flags", "I"), ("padding", "I"),
    ),
    "fuse_write_in": (
        ("fh", "Q"), ("offset", "Q"), ("size", "I"), ("write_flags", "I"),
        ("lock_owner", "Q"), ("flags", "I"), ("padding", "I"),
    ),
    "fuse_write_out": (("size", "I"), ("padding", "I")),
    "fuse_statfs_out": (("st", "fuse_kstatfs"),),
    "fuse_fsync_in": (("fh", "Q"), ("fsync_flags", "I"), ("padding", "I")),
    # The 16-byte form is used only when FUSE_SETXATTR_EXT was negotiated; otherwise the guest
    # sends the first FUSE_COMPAT_SETXATTR_IN_SIZE (8) bytes.
    "fuse_setxattr_in": (
        ("size", "I"), ("flags", "I"), ("setxattr_flags", "I"), ("padding", "I"),
    ),
    "fuse_getxattr_in": (("size", "I"), ("padding", "I")),
    "fuse_getxattr_out": (("size", "I"), ("padding", "I")),
    "fuse_access_in": (("mask", "I"), ("padding", "I")),
    # Kernels before 7.36 send only the first FUSE_COMPAT_INIT_IN_SIZE (16) bytes; flags2 and
    # the rest exist when the guest sets FUSE_INIT_EXT.
    "fuse_init_in": (
        ("major", "I"), ("minor", "I"), ("max_readahead", "I"), ("flags", "I"),
        ("flags2", "I"), ("unused", "11I"),
    ),
    "fuse_init_out": (
        ("major", "I"), ("minor", "I"), ("max_readahead", "I"), ("flags", "I"),
        ("max_background", "H"), ("congestion_threshold", "H"), ("max_write", "I"),
        ("time_gran", "I"), ("max_pages", "H"), ("map_alignment", "H"), ("flags2", "I"),
        ("unused", "7I"),
    ),
    "fuse_interrupt_in": (("unique", "Q"),),
    "fuse_fallocate_in": (
        ("fh", "Q"), ("offset", "Q"), ("length", "Q"), ("mode", "I"), ("padding", "I"),
    ),
    "fuse_lseek_in": (("fh", "Q"), ("offset", "Q"), ("whence", "I"), ("padding", "I")),
    "fuse_syncfs_in": (("padding", "Q"),),
    "fuse_lseek_out": (("offset", "Q"),),
    "fuse_copy_file_range_in": (
        ("fh_in", "Q"), ("off_in", "Q"), ("nodeid_out", "Q"), ("fh_out", "Q"),
        ("off_out", "Q"), ("len", "Q"), ("flags", "Q"),
    ),
    "fuse_dirent": (
        ("ino", "Q"), ("off", "Q"), ("namelen", "I"), ("type", "I"), ("name", "[]"),
    ),
    "fuse_direntplus": (("entry_out", "fuse_entry_out"), ("dirent", "fuse_dirent")),
    # DAX window (virtio-fs shared memory region); fh is u64 max when the guest maps by inode.
    "fuse_setupmapping_in": (
        ("fh", "Q"), ("foffset", "Q"), ("len", "Q"), ("flags", "Q"), ("moffset", "Q"),
    ),
    "fuse_removemapping_in": (("count", "I"),),
    "fuse_removemapping_one": (("moffset", "Q"), ("len", "Q")),
}

_SCALAR_SIZES = {"B": 1, "b": 1, "H": 2, "h": 2, "I": 4, "i": 4, "Q": 8, "q": 8}
_ARRAY_RE = re.compile(r"^(\d+)([BbHhIiQq])$")


class Layout:
    """Derived view of one table entry: ``struct``, ``size``, offsets and a namedtuple type.

    ``flat_fields`` lists every leaf as ``(dotted_name, offset, size)`` (nested struct members
    as ``"attr.ino"``, arrays as one leaf, flexible members with size 0); the ABI test probes
    exactly these.  ``struct`` packs the *flattened* scalars in order (arrays expanded), which
    is what the hot paths use directly; ``unpack``/``pack`` convert to/from the namedtuple.
    """

    size: int
    align: int
    fmt_body: str

    def __init__(self, name: str, fields: tuple[tuple[str, str], ...]) -> None:
        self.name = name
        self.fields = fields
        self.flat_fields: list[tuple[str, int, int]] = []
        fmt_parts: list[str] = []
        offset = 0
        align = 1
        self._shape: list[tuple[str, Any]] = []  # (kind, info) per top-level field
        for fname, spec in fields:
            if spec == "[]":
                self.flat_fields.append((fname, offset, 0))
                self._shape.append(("flex", None))
                continue
            m = _ARRAY_RE.match(spec)
            if spec in _SCALAR_SIZES:
                fsize = falign = _SCALAR_SIZES[spec]
                self._shape.append(("scalar", None))
                part = spec
            elif m:
                count, ch = int(m.group(1)), m.group(2)
                falign = _SCALAR_SIZES[ch]
                fsize = falign * count
                self._shape.append(("array", count))
                part = spec
            elif spec in _LAYOUTS:
                sub = _LAYOUTS[spec]
                fsize, falign = sub.size, sub.align
                self._shape.append(("struct", sub))
                part = sub.fmt_body
            else:
                raise ValueError(f"{name}.{fname}: bad field spec {spec!r}")
            pad = (-offset) % falign
            if pad:
                fmt_parts.append(f"{pad}x")
                offset += pad
            if self._shape[-1][0] == "struct":
                sub = self._shape[-1][1]
                for subname, suboff, subsize in sub.flat_fields:
                    self.flat_fields.append((f"{fname}.{subname}", offset + suboff, subsize))
            else:
                self.flat_fields.append((fname, offset, fsize))
            fmt_parts.append(part)
            offset += fsize
            align = max(align, falign)
        tail = (-offset) % align
        if tail:
            fmt_parts.append(f"{tail}x")
            offset += tail
        self.size = offset
        self.align = align
        self.fmt_body = "".join(fmt_parts)
        self.struct = struct.Struct("<" + self.fmt_body)
        assert self.struct.size == self.size, name
        names = [f for (f, s) in fields if s != "[]"]
        #: The namedtuple class (typed Any: its fields are only known at run time).
        self.tuple_type: Any = collections.namedtuple(name, names)  # type: ignore[misc]
        # Fast path when every field is a scalar.
        self._simple = all(kind == "scalar" for kind, _ in self._shape if kind != "flex")

    def offset_of(self, dotted: str) -> int:
        for fname, off, _ in self.flat_fields:
            if fname == dotted:
                return off
        raise KeyError(dotted)

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0) -> Any:
        """Decode ``size`` bytes at ``offset`` into the namedtuple type."""
        flat = self.struct.unpack_from(data, offset)
        if self._simple:
            return self.tuple_type._make(flat)
        return self._build(iter(flat))

    def _build(self, it: Any) -> Any:
        values = []
        for kind, info in self._shape:
            if kind == "flex":
                continue
            if kind == "scalar":
                values.append(next(it))
            elif kind == "array":
                values.append(tuple(next(it) for _ in range(info)))
            else:
                values.append(info._build(it))
        return self.tuple_type._make(values)

    def _flatten(self, value: Any, out: list[Any]) -> None:
        for (kind, info), v in zip((s for s in self._shape if s[0] != "flex"), value):
            if kind == "scalar":
                out.append(v)
            elif kind == "array":
                if len(v) != info:
                    raise ValueError(f"{self.name}: array needs {info} items")
                out.extend(v)
            else:
                info._flatten(v, out)

    def pack(self, value: Any = None, **kwargs: Any) -> bytes:
        """Encode a namedtuple (or keyword fields; missing ones are zero) to bytes."""
        if value is None:
            value = self.zero()._replace(**kwargs)
        elif kwargs:
            value = value._replace(**kwargs)
        if self._simple:
            return self.struct.pack(*value)
        out: list[Any] = []
        self._flatten(value, out)
        return self.struct.pack(*out)

    def zero(self) -> Any:
        return self.unpack(bytes(self.size))

    def __repr__(self) -> str:
        return f"Layout({self.name}, size={self.size})"


_LAYOUTS: dict[str, Layout] = {}
for _name, _fields in STRUCT_FIELDS.items():
    _LAYOUTS[_name] = Layout(_name, _fields)
del _name, _fields

#: name -> Layout for every struct in :data:`STRUCT_FIELDS`.
LAYOUTS: dict[str, Layout] = _LAYOUTS

IN_HEADER = LAYOUTS["fuse_in_header"]
OUT_HEADER = LAYOUTS["fuse_out_header"]
ATTR = LAYOUTS["fuse_attr"]
KSTATFS = LAYOUTS["fuse_kstatfs"]
ENTRY_OUT = LAYOUTS["fuse_entry_out"]
ATTR_OUT = LAYOUTS["fuse_attr_out"]
FORGET_IN = LAYOUTS["fuse_forget_in"]
FORGET_ONE = LAYOUTS["fuse_forget_one"]
BATCH_FORGET_IN = LAYOUTS["fuse_batch_forget_in"]
GETATTR_IN = LAYOUTS["fuse_getattr_in"]
MKNOD_IN = LAYOUTS["fuse_mknod_in"]
MKDIR_IN = LAYOUTS["fuse_mkdir_in"]
RENAME_IN = LAYOUTS["fuse_rename_in"]
RENAME2_IN = LAYOUTS["fuse_rename2_in"]
LINK_IN = LAYOUTS["fuse_link_in"]
SETATTR_IN = LAYOUTS["fuse_setattr_in"]
OPEN_IN = LAYOUTS["fuse_open_in"]
CREATE_IN = LAYOUTS["fuse_create_in"]
OPEN_OUT = LAYOUTS["fuse_open_out"]
RELEASE_IN = LAYOUTS["fuse_release_in"]
FLUSH_IN = LAYOUTS["fuse_flush_in"]
READ_IN = LAYOUTS["fuse_read_in"]
WRITE_IN = LAYOUTS["fuse_write_in"]
WRITE_OUT = LAYOUTS["fuse_write_out"]
STATFS_OUT = LAYOUTS["fuse_statfs_out"]
FSYNC_IN = LAYOUTS["fuse_fsync_in"]
SETXATTR_IN = LAYOUTS["fuse_setxattr_in"]
GETXATTR_IN = LAYOUTS["fuse_getxattr_in"]
GETXATTR_OUT = LAYOUTS["fuse_getxattr_out"]
ACCESS_IN = LAYOUTS["fuse_access_in"]
INIT_IN = LAYOUTS["fuse_init_in"]
INIT_OUT = LAYOUTS["fuse_init_out"]
INTERRUPT_IN = LAYOUTS["fuse_interrupt_in"]
FALLOCATE_IN = LAYOUTS["fuse_fallocate_in"]
LSEEK_IN = LAYOUTS["fuse_lseek_in"]
LSEEK_OUT = LAYOUTS["fuse_lseek_out"]
COPY_FILE_RANGE_IN = LAYOUTS["fuse_copy_file_range_in"]
SYNCFS_IN = LAYOUTS["fuse_syncfs_in"]
SETUPMAPPING_IN = LAYOUTS["fuse_setupmapping_in"]
REMOVEMAPPING_IN = LAYOUTS["fuse_removemapping_in"]
REMOVEMAPPING_ONE = LAYOUTS["fuse_removemapping_one"]
DIRENT = LAYOUTS["fuse_dirent"]
DIRENTPLUS = LAYOUTS["fuse_direntplus"]

#: Offset of the name in a fuse_dirent / fuse_direntplus record.
FUSE_NAME_OFFSET = DIRENT.offset_of("name")
FUSE_NAME_OFFSET_DIRENTPLUS = DIRENTPLUS.offset_of("dirent.name")


def rec_align(x: int) -> int:
    """``FUSE_REC_ALIGN``: variable-length records are padded to 8 bytes."""
    return (x + 7) & ~7


def dirent_size(namelen: int) -> int:
    return rec_align(FUSE_NAME_OFFSET + namelen)


def direntplus_size(namelen: int) -> int:
    return rec_align(FUSE_NAME_OFFSET_DIRENTPLUS + namelen)
