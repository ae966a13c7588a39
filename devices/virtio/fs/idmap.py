"""``uidmap`` / ``gidmap``: guest ids <-> host ids (issue 12).

Syntax as crosvm's ``--shared-dir ...:uidmap=0 1000 1``: ranges ``inner outer count`` separated
by commas, with the meaning of ``/proc/PID/uid_map`` (guest ids ``inner .. inner+count-1`` are
host ids ``outer .. outer+count-1``).  crosvm gives the map to a user namespace around its
device, and so does the sandbox here where it can (below); otherwise the device itself
translates (:class:`IdMappedFs`, installed by ``devices.virtio.fs.device.passthrough_factory``),
with the user namespace's rules:

* **guest -> host** (the caller of a creation, the owner of a CHOWN, the ids in a POSIX ACL the
  guest sets): a mapped id becomes its host id.  An unmapped caller cannot create (EOVERFLOW, what
  the kernel answers a caller whose fs ids have no mapping), an unmapped new owner is EINVAL
  (chown(2) in a user namespace), an ACL naming an unmapped id is EINVAL (setxattr there).
* **host -> guest** (attributes in every reply, the ids of an ACL the guest reads): a mapped id
  becomes its guest id, an unmapped one the overflow id (``/proc/sys/fs/overflowuid`` and
  ``overflowgid``, 65534 unless changed), as stat(2) in a user namespace shows it.

Without ``uidmap`` uids are not translated at all (identity), likewise gids without ``gidmap``.

**Where the maps are applied** (``idmap: auto|userns|device``, :func:`plan`): with the sandbox
(``sandbox: namespace|chroot``) the jailed device runs by default in a user namespace whose
``uid_map``/``gid_map`` are these maps (devices/jail/userns.py), as crosvm's device does: the
kernel translates, the device holds only the mapped host ids, and :func:`wrap` installs nothing
(``set_kernel_translates``, called by the jailed back-end). The translation stays in the device
where a user namespace cannot serve the share the same way: ``sandbox: none`` (the device is a
thread of the VMM), a map that leaves id 0 unmapped (the jailed device runs as the namespace's
0), ``allow_mknod`` (device nodes need CAP_MKNOD of the initial namespace), or ``idmap: device``.
What the user namespace changes for the guest beyond the translation (README "uidmap"): its
capabilities act only on host inodes whose owner and group are mapped, so a file of an unmapped
owner is reachable through its "other" permission bits only (EACCES/EPERM otherwise), and
protected_hardlinks refuses a link to one.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any, cast

from fuse import abi
from fuse.filesystem import Context, Entry, SetattrRequest

logger = logging.getLogger(__name__)

#: Where the maps are applied (see the module docstring): ``auto`` a user namespace where one
#: can serve the share, else the device; ``userns`` the namespace or a config error; ``device``
#: the device always.
IDMAP_MODES = ("auto", "userns", "device")

#: Largest id a range may reach: (u32)-1 is "no id" for chown and never mappable.
ID_LIMIT = 0xFFFFFFFF
#: How many ranges a map may have (the kernel's limit for uid_map since 4.15).
MAX_RANGES = 340


def overflow_id(kind: str) -> int:
    """The kernel's overflow uid or gid (``kind``: "uid" or "gid"), 65534 if unreadable."""
    try:
        with open(f"/proc/sys/fs/overflow{kind}", "rb") as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return 65534
    return value if 0 <= value < ID_LIMIT else 65534


@dataclasses.dataclass(frozen=True)
class IdRange:
    inner: int   # first guest id
    outer: int   # first host id
    count: int


class IdMap:
    """One direction-agnostic id map (see the module docstring)."""

    def __init__(self, ranges: list[IdRange]) -> None:
        self.ranges = tuple(ranges)
        for side in ("inner", "outer"):
            spans = sorted((getattr(r, side), getattr(r, side) + r.count) for r in ranges)
            for (_a, end), (start, _b) in zip(spans, spans[1:]):
                if start < end:
                    raise ValueError(f"has overlapping {side} ranges")

    @classmethod
    def parse(cls, text: object) -> IdMap:
        """``"0 1000 1,1 100000 65535"`` -> IdMap; ValueError (message without the option name)
        otherwise."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"must be 'inner outer count[,inner outer count...]', got {text!r}")
        ranges = []
        for part in text.split(","):
            words = part.split()
            if len(words) != 3 or not all(w.isdigit() and w.isascii() for w in words):
                raise ValueError(f"range {part.strip()!r} is not 'inner outer count' "
                                 "(three decimal numbers)")
            inner, outer, count = (int(w) for w in words)
            if count < 1 or inner + count > ID_LIMIT or outer + count > ID_LIMIT:
                raise ValueError(f"range {part.strip()!r} must have count >= 1 and stay below "
                                 f"{ID_LIMIT}")
            ranges.append(IdRange(inner, outer, count))
        if len(ranges) > MAX_RANGES:
            raise ValueError(f"has {len(ranges)} ranges, at most {MAX_RANGES}")
        return cls(ranges)

    def to_host(self, guest_id: int) -> int | None:
        for r in self.ranges:
            if r.inner <= guest_id < r.inner + r.count:
                return r.outer + guest_id - r.inner
        return None

    def to_guest(self, host_id: int) -> int | None:
        for r in self.ranges:
            if r.outer <= host_id < r.outer + r.count:
                return r.inner + host_id - r.outer
        return None


class _Identity:
    """The map of an id kind without a ``uidmap``/``gidmap``: nothing is translated."""

    @staticmethod
    def to_host(guest_id: int) -> int:
        return guest_id

    @staticmethod
    def to_guest(host_id: int) -> int:
        return host_id


IDENTITY = _Identity()

# POSIX ACL xattr values (include/uapi/linux/posix_acl_xattr.h): a u32 version (2), then
# entries of (u16 tag, u16 perm, u32 id); only ACL_USER and ACL_GROUP entries carry an id.
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
ACL_USER = 0x02
ACL_GROUP = 0x08
#: renameat2's flag that leaves a whiteout (a new entry) at the old name.
RENAME_WHITEOUT = 1 << 2


def _err(code: int, msg: str) -> OSError:
    return OSError(code, msg)


class IdMappedFs:
    """A FileSystem seen through uid/gid maps: wraps another one (the passthrough) and
    translates ids on the way in and out; every other operation goes to it unchanged
    (``__getattr__``), so new operations of the inner filesystem need nothing here unless they
    carry ids."""

    def __init__(self, inner: Any, uidmap: IdMap | None, gidmap: IdMap | None) -> None:
        self.inner = inner
        self.uids = uidmap or IDENTITY
        self.gids = gidmap or IDENTITY
        self.overflow_uid = overflow_id("uid")
        self.overflow_gid = overflow_id("gid")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # ---------------------------------------------------------------- translation

    def host_caller(self, ctx: Context) -> Context:
        """The request's caller as host ids (EOVERFLOW when either has no mapping)."""
        uid, gid = self.uids.to_host(ctx.uid), self.gids.to_host(ctx.gid)
        if uid is None or gid is None:
            raise _err(errno.EOVERFLOW, f"caller {ctx.uid}:{ctx.gid} has no host id (uidmap/gidmap)")
        return ctx._replace(uid=uid, gid=gid)

    def guest_uid(self, host_uid: int) -> int:
        uid = self.uids.to_guest(host_uid)
        return self.overflow_uid if uid is None else uid

    def guest_gid(self, host_gid: int) -> int:
        gid = self.gids.to_guest(host_gid)
        return self.overflow_gid if gid is None else gid

    def guest_stat(self, st: os.stat_result) -> os.stat_result:
        """``st`` with owner and group as the guest sees them (every other field unchanged,
        nanosecond times included)."""
        seq, extra = cast("tuple[tuple[int, ...], dict[str, Any]]", st.__reduce__()[1])
        return os.stat_result((*seq[:4], self.guest_uid(st.st_uid), self.guest_gid(st.st_gid),
                               *seq[6:]), extra)

    def guest_entry(self, entry: Entry) -> Entry:
        if entry.attr is None:
            return entry
        return dataclasses.replace(entry, attr=self.guest_stat(entry.attr))

    def acl(self, value: bytes, to_host: bool) -> bytes:
        """A POSIX ACL xattr value with its ACL_USER/ACL_GROUP ids translated; a value that is
        not a well-formed ACL passes unchanged (the host kernel judges it)."""
        n = len(value) - _ACL_HEADER.size
        if n < 0 or n % _ACL_ENTRY.size:
            return value
        out = bytearray(value)
        for off in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
            tag, perm, xid = _ACL_ENTRY.unpack_from(value, off)
            if tag not in (ACL_USER, ACL_GROUP):
                continue
            ids = self.uids if tag == ACL_USER else self.gids
            if to_host:
                new = ids.to_host(xid)
                if new is None:
                    raise _err(errno.EINVAL, f"ACL names id {xid}, which has no host id")
            else:
                new = (self.guest_uid if tag == ACL_USER else self.guest_gid)(xid)
            _ACL_ENTRY.pack_into(out, off, tag, perm, new)
        return bytes(out)

    @staticmethod
    def _host_owner(guest_id: int, ids: IdMap | _Identity, kind: str) -> int:
        """A CHOWN's new owner or group as a host id (EINVAL without one, as in a user
        namespace)."""
        host = ids.to_host(guest_id)
        if host is None:
            raise _err(errno.EINVAL, f"{kind} {guest_id} has no host id ({kind}map)")
        return host

    # ---------------------------------------------------------------- operations with ids

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return self.guest_entry(self.inner.lookup(ctx, parent, name))

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        st, timeout = self.inner.getattr(ctx, nodeid, fh)
        return self.guest_stat(st), timeout

    def setattr(self, ctx: Context, nodeid: int, req: SetattrRequest
                ) -> tuple[os.stat_result, float]:
        if req.valid & (abi.FATTR_UID | abi.FATTR_GID):
            uid = self._host_owner(req.uid, self.uids, "uid") if req.valid & abi.FATTR_UID else req.uid
            gid = self._host_owner(req.gid, self.gids, "gid") if req.valid & abi.FATTR_GID else req.gid
            req = dataclasses.replace(req, uid=uid, gid=gid)
        st, timeout = self.inner.setattr(ctx, nodeid, req)
        return self.guest_stat(st), timeout

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        return self.guest_entry(self.inner.symlink(self.host_caller(ctx), parent, name, target))

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        return self.guest_entry(self.inner.mknod(self.host_caller(ctx), parent, name, mode,
                                                 rdev, umask))

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        return self.guest_entry(self.inner.mkdir(self.host_caller(ctx), parent, name, mode,
                                                 umask))

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        # Only RENAME_WHITEOUT creates (a whiteout owned by the caller): the caller needs host ids.
        if isinstance(flags, int) and flags & RENAME_WHITEOUT:
            ctx = self.host_caller(ctx)
        return self.inner.rename(ctx, parent, name, newparent, newname, flags)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        return self.guest_entry(self.inner.link(ctx, nodeid, newparent, newname))

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int, open_flags: int = 0) -> tuple[Entry, int, int]:
        entry, fh, fopen = self.inner.create(self.host_caller(ctx), parent, name, mode, flags,
                                             umask, open_flags)
        return self.guest_entry(entry), fh, fopen

    def readdirplus(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[Any]:
        it = self.inner.readdirplus(ctx, nodeid, fh, offset)
        return self._guest_plus(it)

    def _guest_plus(self, it: Iterator[Any]) -> Iterator[Any]:
        try:
            for dirent, entry in it:
                yield dirent, self.guest_entry(entry)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        uid, gid = self.uids.to_host(ctx.uid), self.gids.to_host(ctx.gid)
        # An unmapped caller is nobody on the host: the overflow ids own nothing there.
        ctx = ctx._replace(uid=self.overflow_uid if uid is None else uid,
                           gid=self.overflow_gid if gid is None else gid)
        return self.inner.access(ctx, nodeid, mask)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        if name in ACL_NAMES:
            value = self.acl(bytes(value), to_host=True)
        return self.inner.setxattr(ctx, nodeid, name, value, flags)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        res = self.inner.getxattr(ctx, nodeid, name, size)
        if name in ACL_NAMES and isinstance(res, (bytes, bytearray)):
            return self.acl(bytes(res), to_host=False)
        return res


def userns_obstacle(uidmap: str | None, gidmap: str | None, sandbox: str,
                    allow_mknod: bool) -> str | None:
    """Why a user namespace cannot apply these maps the way the device would (None: it can)."""
    if sandbox == "none":
        return "sandbox: none runs the device inside the VMM process (no namespace of its own)"
    for kind, text in (("uid", uidmap), ("gid", gidmap)):
        if text is not None and IdMap.parse(text).to_host(0) is None:
            return (f"{kind}map leaves {kind} 0 unmapped (the jailed device runs as its "
                    "namespace's 0)")
    if allow_mknod:
        return "allow_mknod: device nodes need CAP_MKNOD of the initial user namespace"
    return None


def plan(options: Any) -> tuple[str, str]:
    """(where the maps of an FsOptions apply: "none" | "userns" | "device", why), for the jail
    and the start-up log line."""
    if options.uidmap is None and options.gidmap is None:
        return "none", "no uidmap/gidmap"
    if options.idmap == "device":
        return "device", "idmap: device"
    why = userns_obstacle(options.uidmap, options.gidmap, options.sandbox, options.allow_mknod)
    if why is None:
        return "userns", "the sandbox's user namespace maps them"
    return "device", why


def kernel_ranges(text: str | None) -> tuple[tuple[int, int, int], ...] | None:
    """A map option as the lines of /proc/PID/uid_map (JailSpec.uid_map), None without one."""
    if text is None:
        return None
    return tuple((r.inner, r.outer, r.count) for r in IdMap.parse(text).ranges)


class _KernelMaps:
    on = False


def set_kernel_translates(on: bool) -> None:
    """Say that this process runs in a user namespace with the share's maps (the jailed back-end
    calls it after devices.jail.enter): :func:`wrap` then leaves the ids to the kernel, which
    would otherwise see them translated twice."""
    _KernelMaps.on = on


def wrap(fs: Any, uidmap: str | None, gidmap: str | None) -> Any:
    """``fs`` itself when neither map is given or the process's user namespace applies them,
    else ``fs`` behind an :class:`IdMappedFs`."""
    if (uidmap is None and gidmap is None) or _KernelMaps.on:
        return fs
    return IdMappedFs(fs, IdMap.parse(uidmap) if uidmap is not None else None,
                      IdMap.parse(gidmap) if gidmap is not None else None)
