"""PassthroughFs: serve one host directory to the guest over FUSE (crosvm's passthrough.rs).

Confinement model (what keeps every request inside the shared directory):

* The guest names files only by node ids we handed out plus single path components. Every node
  id maps to an O_PATH fd we hold (inodes.py); nothing is ever resolved from a path string
  built out of guest input.
* A component is resolved relative to its parent's fd with openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, O_PATH | O_NOFOLLOW). Names that are empty,
  contain '/' or NUL, or are '.'/'..' are refused before any syscall (with the server's own
  checks from fuse.limits, so both give the same errno), so even the openat fallback cannot
  climb out. The server never follows a symlink: looking one up yields the
  symlink itself, OPEN of a symlink is ELOOP, READLINK only returns its text.
* Files are (re)opened through ``/proc/self/fd/N`` of the inode's O_PATH fd, which reopens
  exactly that inode and never re-resolves a name, so a symlink swapped into the tree between
  LOOKUP and OPEN cannot redirect the open. CREATE opens with O_NOFOLLOW (and O_EXCL first).
* Hard links are made from the inode's own fd (linkat AT_EMPTY_PATH), so the guest can only
  link inodes it already reached inside the share.

Credentials: the VMM runs as root and the guest kernel enforces permissions itself (virtio-fs
mounts use default_permissions, with the caller's full credentials, supplementary groups included,
which FUSE 7.37 does not send), so requests run with the device's credentials and the host kernel
does not check them again.  The one exception is creation (MKNOD, MKDIR, SYMLINK, CREATE, a
whiteout): it runs as the caller's fs uid/gid with the request's umask (creds.py), so the host
kernel gives the entry the caller's ownership and the guest's mode atomically, as crosvm and
virtiofsd do.  A creation whose reply is an error (e.g. no fd left to register the entry) is
undone, so an error never leaves an entry behind.

Policies (policy.py): set-id bits, device nodes and xattr names a guest may leave on the host are
limited by default (``allow_setid``, ``allow_mknod``, ``xattr_policy``); set-id bits are killed
on write, truncate and chown as a local file system does (FUSE_HANDLE_KILLPRIV_V2).

Resources (README "Resource limits"): at most ``max_inodes`` node ids and ``max_handles`` open
handles, each holding one fd (fdbudget.py raises RLIMIT_NOFILE for them); a directory handle keeps
at most ``readdir_buffer`` bytes of its listing (dirstream.py streams READDIR from the fd). Past a
limit the request gets ENFILE or EMFILE and nothing else changes. Requests that need no new fd keep
working when the process has none left: a LOOKUP of a name whose inode is known (fstatat, then the
table), FLUSH (fdatasync when no fd is left for the duplicate it closes), truncate (through the
inode's magic link), and everything on open handles. Long calls are split (chunks.py) so that a
device reset never waits for a whole 512 MiB FALLOCATE or COPY_FILE_RANGE.

Durability: FSYNC and FSYNCDIR fsync the handle's fd and SYNCFS syncfs()es every host file system
the guest has reached, each before the reply; FLUSH only runs the host's flush-on-close (a local
file system writes nothing on close, so neither does FLUSH).

Every public method raises only OSError with a meaningful errno (see ``_guard``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import stat
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

from fuse import abi
from fuse.filesystem import Context, DirEntry, Entry, FileSystem, InitReply, SetattrRequest
from fuse.io import Reader, Writer
from fuse.limits import (
    OFFSET_MAX,
    check_name,
    check_symlink_target,
    check_xattr_name,
    check_xattr_size,
)
from fuse.logthrottle import LogThrottle

from . import casefold, chunks, creds, dax, fdbudget, syscalls
from .dirstream import DirStream
from .handles import HandleTable
from .inodes import ROOT_ID, Inode, InodeTable, proc_fd_path
from .options import FsOptions
from .policy import XattrMap, decode_rdev, kill_bits, permitted_mode

logger = logging.getLogger(__name__)
#: Log lines a guest can cause from here (bugs it can trigger again and again) are rate-limited.
_log = LogThrottle(logger)

_XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
_XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)

# Open flags passed through to the host. O_CREAT/O_EXCL/O_NOCTTY/O_PATH/O_TMPFILE/O_DIRECTORY
# are ours to decide; O_DIRECT is dropped (guest buffers and offsets need not be aligned for the
# host filesystem, and some, like tmpfs, refuse it), as virtiofsd does by default.
_PASS_OPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_DSYNC | os.O_SYNC
                    | os.O_NOATIME | os.O_NONBLOCK)

_F = TypeVar("_F", bound=Callable[..., Any])


def _guard(fn: _F) -> _F:
    """Turn every failure into OSError(errno): the server maps it to a -errno reply, and nothing
    a hostile guest sends may raise anything else into the worker thread."""

    @functools.wraps(fn)
    def wrapper(self: PassthroughFs, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except OSError as e:
            if not e.errno or e.errno <= 0:
                _log.warn("%s: OSError without errno: %s", fn.__name__, e)
                raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
            raise
        except (ValueError, OverflowError, TypeError) as e:
            # Malformed arguments (embedded NUL, out-of-range offsets, wrong types).
            logger.debug("%s: invalid argument: %s", fn.__name__, e)
            raise OSError(errno.EINVAL, str(e)) from None
        except Exception as e:  # noqa: BLE001 - the contract is "only OSError escapes"
            _log.bug(fn.__name__, e)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None

    return wrapper  # type: ignore[return-value]


def _guard_iter(name: str, it: Iterator[Any]) -> Iterator[Any]:
    """`_guard` for the lazily evaluated part of readdir/readdirplus."""
    try:
        yield from it
    except OSError as e:
        if not e.errno or e.errno <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
        raise
    except Exception as e:  # noqa: BLE001
        _log.bug(name, e)
        raise OSError(errno.EIO, os.strerror(errno.EIO)) from None


def _err(code: int, msg: str = "") -> OSError:
    return OSError(code, msg or os.strerror(code))


def _check_int(value: Any, what: str, lo: int = 0, hi: int = OFFSET_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _err(errno.EINVAL, f"{what} out of range: {value!r}")
    return value


#: FALLOCATE modes that act on each byte of the range independently, so that the range may be
#: done in pieces (COLLAPSE_RANGE and INSERT_RANGE move the rest of the file: never split).
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_FALLOC_FL_UNSHARE_RANGE = 0x40
_SPLITTABLE_FALLOC = (_FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_ZERO_RANGE
                      | _FALLOC_FL_UNSHARE_RANGE)
_NO_FD_LEFT = (errno.EMFILE, errno.ENFILE)


def _stopped(what: str) -> OSError:
    return _err(errno.EINTR, f"{what} stopped between pieces: the device is being reset")


def _dt_from_mode(mode: int) -> int:
    return {
        stat.S_IFREG: abi.DT_REG, stat.S_IFDIR: abi.DT_DIR, stat.S_IFLNK: abi.DT_LNK,
        stat.S_IFIFO: abi.DT_FIFO, stat.S_IFSOCK: abi.DT_SOCK, stat.S_IFCHR: abi.DT_CHR,
        stat.S_IFBLK: abi.DT_BLK,
    }.get(stat.S_IFMT(mode), abi.DT_UNKNOWN)


class PassthroughFs(FileSystem):
    """A FUSE filesystem exposing ``options.source`` (see the module docstring)."""

    def __init__(self, options: FsOptions) -> None:
        self.options = options
        self._inodes = InodeTable(options.max_inodes)
        self._handles = HandleTable(options.max_handles)
        self._as_root = os.geteuid() == 0
        self._xattrs = XattrMap(options.xattr_policy, options.allow_selinux_xattr,
                                acl=options.posix_acl)
        self.fd_budget = fdbudget.reserve(self, options.max_inodes + options.max_handles,
                                          f"virtio-fs {options.tag}")
        self.dax: dax.DaxWindow | None = None   # the device's DAX window, when it has one
        self._open_root()

    # ------------------------------------------------------------------ helpers

    def _open_root(self) -> None:
        # The share root itself may be reached through a symlink: the admin chose the path.
        fd = os.open(self.options.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            self._inodes.set_root(fd, st)
        except BaseException:
            os.close(fd)
            raise

    @property
    def _timeout(self) -> float:
        return self.options.positive_timeout

    def _entry(self, inode: Inode, st: os.stat_result) -> Entry:
        t = self._timeout
        return Entry(nodeid=inode.nodeid, generation=0, attr=st, entry_timeout=t, attr_timeout=t)

    def _fopen_flags(self, is_dir: bool) -> int:
        cache = self.options.cache
        if is_dir:
            return abi.FOPEN_CACHE_DIR if cache == "always" else 0
        if cache == "never":
            return abi.FOPEN_DIRECT_IO
        if cache == "always":
            return abi.FOPEN_KEEP_CACHE
        return 0

    def _open_flags(self, flags: int) -> int:
        flags = _check_int(flags, "flags", 0, 0xFFFFFFFF)
        out = flags & _PASS_OPEN_FLAGS
        acc = out & os.O_ACCMODE
        if acc == os.O_ACCMODE:
            raise _err(errno.EINVAL, "bad access mode")
        if self.options.writeback:
            # With a writeback cache the guest may read pages of a file opened write-only (to
            # fill partial pages) and computes append offsets itself (crosvm does the same).
            if acc == os.O_WRONLY:
                out = (out & ~os.O_ACCMODE) | os.O_RDWR
            out &= ~os.O_APPEND
        return out | os.O_CLOEXEC

    def _lookup_fd(self, parent: Inode, name: bytes) -> int:
        """O_PATH fd of `name` inside `parent`, never following a symlink or leaving the tree."""
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        return syscalls.openat2(parent.fd, name, os.O_PATH | os.O_NOFOLLOW)

    def _add(self, fd: int) -> Entry:
        """Register an O_PATH fd (ownership passes to the table) and build its Entry."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self._inodes.add(fd, st)
        return self._entry(inode, st)

    def _do_lookup(self, parent: Inode, name: bytes) -> Entry:
        """One lookup of `name`: an fstatat first, so that a name whose inode the table already
        knows costs no fd (it must keep working when the fd limit is reached); only an unknown
        inode is opened. The fstatat's answer is used only as a key: the fd opened afterwards is
        what gets registered, so a name swapped in between is never mistaken for the old one."""
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        known = self._inodes.add_known(st)
        if known is not None:
            return self._entry(known, st)
        return self._add(self._lookup_fd(parent, name))

    def _stored(self, parent: Inode, name: bytes) -> bytes:
        """The host's spelling of `name` in `parent` under ``ascii_casefold`` (casefold.py)."""
        if not self.options.ascii_casefold or not parent.is_dir:
            return name
        return casefold.stored_name(parent.fd, parent.proc_path, name)

    def _creating(self, ctx: Context, umask: int) -> Any:
        """Context for a creation as the caller (see module docstring and creds.py)."""
        return creds.creating_as(ctx.uid, ctx.gid, umask, self._as_root)

    def _enter_new(self, ctx: Context, parent: Inode, name: bytes, ftype: int) -> Entry:
        """Register the entry this request just created as `name`; if that fails (EMFILE, a
        limit), remove the entry again so the error reply leaves nothing behind."""
        try:
            return self._do_lookup(parent, name)
        except BaseException:
            self._undo_create(ctx, parent, name, ftype)
            raise

    def _undo_create(self, ctx: Context, parent: Inode, name: bytes, ftype: int) -> None:
        """Remove `name`, just created by this request, unless it is visibly not ours any more
        (another type or owner: replaced from the host in between)."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            if stat.S_IFMT(st.st_mode) != ftype or (self._as_root and st.st_uid != ctx.uid):
                return
            if ftype == stat.S_IFDIR:
                os.rmdir(name, dir_fd=parent.fd)
            else:
                os.unlink(name, dir_fd=parent.fd)
        except OSError as e:
            _log.warn("could not remove %r after a failed creation: %s", name, e)

    def _kill_setid(self, target: int | str, st: os.stat_result) -> None:
        """Clear the set-id bits a write/truncate/chown by an unprivileged caller clears
        (policy.kill_bits).  ``target`` is an open fd (not O_PATH) or a path."""
        kill = kill_bits(st.st_mode)
        if kill:
            mode = stat.S_IMODE(st.st_mode) & ~kill
            if isinstance(target, int):
                os.fchmod(target, mode)
            else:
                os.chmod(target, mode)

    def _kill_remapped_capability(self, target: int | str) -> None:
        """A write, truncate or chown removes a file capability (the VFS's ATTR_KILL_PRIV, for
        every caller).  The host kernel does it for a real security.capability; a remapped one
        is only a user xattr to it, so it is removed here."""
        name = self._xattrs.remapped_capability
        if name is None or syscalls.xattr_absent(target, name):
            return
        try:
            os.removexattr(target, name)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise

    # ------------------------------------------------------------------ session

    @_guard
    def init(self, capable: int) -> InitReply:
        """Say what we support. The session (fuse.session) masks it with what the guest offers
        and has already ended any previous session with destroy(), which closed the root."""
        if not len(self._inodes):
            self._open_root()
        # HANDLE_KILLPRIV_V2: set-id bits are cleared here, on the guest's flags (policy.py),
        # so the guest stops sending GETXATTR(security.capability) before every WRITE.
        # DONT_MASK: the umask is applied here (creds.py), by the host kernel, which also knows
        # when a default ACL replaces it; the guest sends the mode and its umask.
        want = (abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_PARALLEL_DIROPS
                | abi.FUSE_ATOMIC_O_TRUNC | abi.FUSE_BIG_WRITES | abi.FUSE_ASYNC_READ
                | abi.FUSE_HANDLE_KILLPRIV_V2 | abi.FUSE_DONT_MASK)
        if self.options.cache != "never":
            want |= abi.FUSE_CACHE_SYMLINKS
        if self.options.cache == "auto":
            want |= abi.FUSE_AUTO_INVAL_DATA
        if self.options.writeback:
            want |= abi.FUSE_WRITEBACK_CACHE
        if self.options.posix_acl:
            # The guest enforces POSIX ACLs (it reads system.posix_acl_* through GETXATTR) and
            # leaves mode<->ACL updates, default ACLs and the umask to the host (policy.py).
            want |= abi.FUSE_POSIX_ACL
        if self.dax is not None:
            return InitReply(flags=want | abi.FUSE_MAP_ALIGNMENT,
                             map_alignment=self.dax.alignment.bit_length() - 1)
        return InitReply(flags=want)

    @_guard
    def destroy(self) -> None:
        """End the session: every fd goes, the root's too (init() reopens it)."""
        if self.dax is not None:
            self.dax.reset()
        self._clear_tables()

    def close(self) -> None:
        """The device is gone: close every fd and return the fd budget (fdbudget.release)."""
        try:
            self._clear_tables()
        finally:
            fdbudget.release(self)

    def _clear_tables(self) -> None:
        """Close every fd of the session. A table whose lock is wedged (a bug, logged by
        PinnedFds) is abandoned for a fresh one, so a new session always starts working."""
        if not self._handles.clear():
            self._handles = HandleTable(self.options.max_handles)
        if not self._inodes.clear():
            self._inodes = InodeTable(self.options.max_inodes)

    def inode_count(self) -> int:
        """Number of node ids currently known (root included); for tests and metrics."""
        return len(self._inodes)

    def handle_count(self) -> int:
        return len(self._handles)

    def dir_buffer_bytes(self) -> int:
        """Bytes of directory listings kept between READDIRs, all handles together."""
        return self._handles.dir_buffer_bytes()

    def lookup_count(self, nodeid: int) -> int:
        return self._inodes.lookup_count(nodeid)

    # ------------------------------------------------------------------ names

    @_guard
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        name = check_name(name)
        with self._inodes.pin(parent) as p:
            name = self._stored(p, name)
            try:
                return self._do_lookup(p, name)
            except OSError as e:
                neg = self.options.negative_timeout
                if e.errno == errno.ENOENT and neg > 0:
                    # nodeid 0 + entry_valid: the guest caches "does not exist" (libfuse and
                    # crosvm negative_timeout). Nothing was added, so nothing will be forgotten.
                    return Entry.negative(neg)
                raise

    @_guard
    def forget(self, nodeid: int, nlookup: int) -> None:
        if isinstance(nodeid, int) and isinstance(nlookup, int):
            self._inodes.forget(nodeid, nlookup)

    @_guard
    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        for item in items:
            try:
                nodeid, nlookup = item
            except (TypeError, ValueError):
                continue
            if isinstance(nodeid, int) and isinstance(nlookup, int):
                self._inodes.forget(nodeid, nlookup)

    @_guard
    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        # The handle (if any) refers to the same inode, so the inode's fd answers for both.
        with self._inodes.pin(nodeid) as inode:
            return os.fstat(inode.fd), self._timeout

    @_guard
    def setattr(self, ctx: Context, nodeid: int, req: SetattrRequest
                ) -> tuple[os.stat_result, float]:
        valid = _check_int(req.valid, "valid", 0, 0xFFFFFFFF)
        with self._inodes.pin(nodeid) as inode:
            if valid & abi.FATTR_MODE:
                if inode.is_symlink:
                    raise _err(errno.EOPNOTSUPP, "chmod of a symlink")
                mode = _check_int(req.mode, "mode", 0, 0xFFFFFFFF)
                os.chmod(inode.proc_path,
                         permitted_mode(mode, inode.is_dir, self.options.allow_setid))

            if valid & (abi.FATTR_UID | abi.FATTR_GID):
                uid = _check_int(req.uid, "uid", 0, 0xFFFFFFFF) if valid & abi.FATTR_UID else -1
                gid = _check_int(req.gid, "gid", 0, 0xFFFFFFFF) if valid & abi.FATTR_GID else -1
                # The host kernel clears set-id bits of a non-directory here itself.
                syscalls.fchownat_empty(inode.fd, uid, gid)
                if inode.is_reg:
                    self._kill_remapped_capability(inode.proc_path)

            if valid & abi.FATTR_KILL_SUIDGID and not valid & abi.FATTR_MODE and inode.is_reg:
                # Before a truncate, as the VFS does: never new data with old privileges.
                self._kill_setid(inode.proc_path, os.fstat(inode.fd))

            if valid & abi.FATTR_SIZE:
                self._truncate(inode, req, _check_int(req.size, "size"))
                self._kill_remapped_capability(inode.proc_path)

            a_now = bool(req.atime_now or valid & abi.FATTR_ATIME_NOW)
            m_now = bool(req.mtime_now or valid & abi.FATTR_MTIME_NOW)
            if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW
                        | abi.FATTR_MTIME_NOW):
                atime = self._timespec(valid & (abi.FATTR_ATIME | abi.FATTR_ATIME_NOW), a_now,
                                       req.atime_ns)
                mtime = self._timespec(valid & (abi.FATTR_MTIME | abi.FATTR_MTIME_NOW), m_now,
                                       req.mtime_ns)
                syscalls.utimensat_empty(inode.fd, atime, mtime)

            return os.fstat(inode.fd), self._timeout

    @staticmethod
    def _timespec(is_set: int, now: bool, ns: int) -> tuple[int, int]:
        if not is_set:
            return (0, syscalls.UTIME_OMIT)
        if now:
            return (0, syscalls.UTIME_NOW)
        ns = _check_int(ns, "time", -OFFSET_MAX - 1)
        return divmod(ns, 1_000_000_000)

    def _truncate(self, inode: Inode, req: SetattrRequest, size: int) -> None:
        if inode.is_dir:
            raise _err(errno.EISDIR)
        if not inode.is_reg:
            raise _err(errno.EINVAL, "truncate of a non-regular file")
        if req.valid & abi.FATTR_FH and req.fh is not None:
            with self._handles.pin(req.fh, inode.nodeid) as h:
                try:
                    os.ftruncate(h.fd, size)
                    return
                except OSError as e:
                    if e.errno not in (errno.EBADF, errno.EINVAL):
                        raise
                    # Handle opened read-only: fall through to a write-only reopen.
        # truncate(2) through the magic link reaches exactly this inode and needs no new fd.
        os.truncate(inode.proc_path, size)

    @_guard
    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        with self._inodes.pin(nodeid) as inode:
            if not inode.is_symlink:
                raise _err(errno.EINVAL, "not a symlink")
            # readlinkat(fd, "") reads the link the O_PATH fd refers to; it follows nothing.
            return os.readlink(b"", dir_fd=inode.fd)

    @_guard
    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        name = check_name(name)
        target = check_symlink_target(target)
        with self._inodes.pin_dir(parent) as p:
            name = self._stored(p, name)
            self._inodes.check_room()
            # The target is only text stored in the link; the server never follows it.
            with self._creating(ctx, 0):
                os.symlink(target, name, dir_fd=p.fd)
            return self._enter_new(ctx, p, name, stat.S_IFLNK)

    @_guard
    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        name = check_name(name)
        mode = _check_int(mode, "mode", 0, 0xFFFFFFFF)
        umask = _check_int(umask, "umask", 0, 0xFFFFFFFF)
        ftype = stat.S_IFMT(mode) or stat.S_IFREG
        dev = 0
        if ftype in (stat.S_IFCHR, stat.S_IFBLK):
            if not self.options.allow_mknod:
                raise _err(errno.EPERM, "device nodes are not allowed in the share "
                                        "(allow_mknod)")
            dev = decode_rdev(_check_int(rdev, "rdev", 0, 0xFFFFFFFF))
        elif ftype == stat.S_IFDIR:
            raise _err(errno.EPERM, "mknod of a directory")      # as mknod(2) says
        elif ftype not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EINVAL, "bad file type for mknod")
        perm = permitted_mode(mode, False, self.options.allow_setid)
        with self._inodes.pin_dir(parent) as p:
            name = self._stored(p, name)
            self._inodes.check_room()
            with self._creating(ctx, umask):
                os.mknod(name, ftype | perm, dev, dir_fd=p.fd)
            return self._enter_new(ctx, p, name, ftype)

    @_guard
    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        name = check_name(name)
        mode = _check_int(mode, "mode", 0, 0xFFFFFFFF)
        umask = _check_int(umask, "umask", 0, 0xFFFFFFFF)
        perm = permitted_mode(mode, True, self.options.allow_setid)
        with self._inodes.pin_dir(parent) as p:
            name = self._stored(p, name)
            self._inodes.check_room()
            with self._creating(ctx, umask):
                os.mkdir(name, perm, dir_fd=p.fd)
            return self._enter_new(ctx, p, name, stat.S_IFDIR)

    @_guard
    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        name = check_name(name)
        with self._inodes.pin_dir(parent) as p:
            os.unlink(self._stored(p, name), dir_fd=p.fd)

    @_guard
    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        name = check_name(name)
        with self._inodes.pin_dir(parent) as p:
            os.rmdir(self._stored(p, name), dir_fd=p.fd)

    @_guard
    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        name = check_name(name)
        newname = check_name(newname)
        flags = _check_int(flags, "flags", 0, 0xFFFFFFFF)
        if flags & ~(syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE
                     | syscalls.RENAME_WHITEOUT):
            raise _err(errno.EINVAL, "unknown rename flags")
        if flags & syscalls.RENAME_WHITEOUT and not self.options.allow_mknod:
            # A whiteout is a 0:0 character device left at the old name: a device node, and
            # what the host kernel refuses a caller without CAP_MKNOD.
            raise _err(errno.EPERM, "RENAME_WHITEOUT makes a device node (allow_mknod)")
        with self._inodes.pin(parent) as p, self._inodes.pin(newparent) as np:
            if not p.is_dir or not np.is_dir:
                raise _err(errno.ENOTDIR)
            name, stored_new = self._stored(p, name), self._stored(np, newname)
            if not (p.nodeid == np.nodeid and stored_new == name):
                newname = stored_new   # else a rename to another case of itself: respell it
            if flags & syscalls.RENAME_WHITEOUT:
                with self._creating(ctx, 0):     # the whiteout belongs to the caller
                    syscalls.renameat2(p.fd, name, np.fd, newname, flags)
            else:
                syscalls.renameat2(p.fd, name, np.fd, newname, flags)

    @_guard
    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        newname = check_name(newname)
        with self._inodes.pin(nodeid) as inode, self._inodes.pin(newparent) as np:
            if inode.is_dir:
                raise _err(errno.EPERM, "hard link to a directory")
            if not np.is_dir:
                raise _err(errno.ENOTDIR)
            newname = self._stored(np, newname)
            try:
                # Links exactly the inode we hold (never a name, never a symlink's target).
                syscalls.linkat(inode.fd, b"", np.fd, newname, syscalls.AT_EMPTY_PATH)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                # AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the magic link names the same inode.
                syscalls.linkat(syscalls.AT_FDCWD, inode.proc_path.encode(), np.fd, newname,
                                syscalls.AT_SYMLINK_FOLLOW)
            # The new name is the same inode: count one more lookup on it (no new fd).
            st = os.fstat(inode.fd)
            self._inodes.ref(inode)
            return self._entry(inode, st)

    # ------------------------------------------------------------------ files

    @_guard
    def open(self, ctx: Context, nodeid: int, flags: int, open_flags: int = 0
             ) -> tuple[int, int]:
        oflags = self._open_flags(flags)
        with self._inodes.pin(nodeid) as inode:
            if inode.is_dir:
                raise _err(errno.EISDIR)
            if inode.is_symlink:
                raise _err(errno.ELOOP, "refusing to open a symlink")
            if not inode.is_reg:
                # FIFOs/sockets are handled by the guest kernel; opening them here could block
                # the worker thread.
                raise _err(errno.ENXIO, "not a regular file")
            self._handles.check_room()
            fd = os.open(inode.proc_path, oflags)
            try:
                self._truncated(fd, oflags, open_flags)
            except BaseException:
                os.close(fd)
                raise
            return self._handles.add(nodeid, fd, False), self._fopen_flags(False)

    def _truncated(self, fd: int, oflags: int, open_flags: int) -> None:
        """An open with O_TRUNC truncated the file: clear what a truncate clears."""
        if not oflags & os.O_TRUNC:
            return
        if open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
            self._kill_setid(fd, os.fstat(fd))
        self._kill_remapped_capability(fd)

    @_guard
    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int, open_flags: int = 0) -> tuple[Entry, int, int]:
        name = check_name(name)
        mode = _check_int(mode, "mode", 0, 0xFFFFFFFF)
        umask = _check_int(umask, "umask", 0, 0xFFFFFFFF)
        oflags = self._open_flags(flags)
        want_excl = bool(flags & os.O_EXCL)
        perm = permitted_mode(mode, False, self.options.allow_setid)
        with self._inodes.pin_dir(parent) as p:
            name = self._stored(p, name)
            self._handles.check_room()
            self._inodes.check_room()
            fd, created = self._create_open(ctx, p, name, oflags, perm, umask, want_excl)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise _err(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.ENXIO)
                if not oflags & os.O_NONBLOCK:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                if not created:
                    self._truncated(fd, oflags, open_flags)
                opath = os.open(proc_fd_path(fd), os.O_PATH | os.O_CLOEXEC)
                entry = self._add(opath)
            except BaseException:
                if created:
                    self._undo_create(ctx, p, name, stat.S_IFREG)
                os.close(fd)
                raise
            try:
                fh = self._handles.add(entry.nodeid, fd, False)   # closes fd if it fails
            except BaseException:
                self._inodes.forget(entry.nodeid, 1)
                if created:
                    self._undo_create(ctx, p, name, stat.S_IFREG)
                raise
            return entry, fh, self._fopen_flags(False)

    def _create_open(self, ctx: Context, p: Inode, name: bytes, oflags: int, mode: int,
                     umask: int, want_excl: bool) -> tuple[int, bool]:
        """Open or create `name`; returns (fd, created). O_EXCL is tried first so that only
        files we really created count as ours (their owner and mode are the caller's; an
        existing file is opened as the device). O_NONBLOCK keeps an existing FIFO from blocking
        the worker (it is refused after the fstat)."""
        base = oflags | os.O_NOFOLLOW | os.O_NONBLOCK
        for _ in range(8):
            try:
                with self._creating(ctx, umask):
                    fd = syscalls.openat2(p.fd, name, base | os.O_CREAT | os.O_EXCL, mode)
                return fd, True
            except OSError as e:
                if e.errno != errno.EEXIST or want_excl:
                    raise
            try:
                return syscalls.openat2(p.fd, name, base, 0), False
            except OSError as e:
                if e.errno != errno.ENOENT:   # removed in between: try to create again
                    raise
        raise _err(errno.EAGAIN, "create raced with concurrent unlinks")

    @_guard
    def read(self, ctx: Context, nodeid: int, fh: int, writer: Writer, size: int,
             offset: int) -> int:
        size = _check_int(size, "size", 0, 0xFFFFFFFF)
        offset = _check_int(offset, "offset")
        with self._handles.pin(fh, nodeid) as h:
            fd = h.fd
            total, stopped = chunks.run(
                size, lambda done, n: writer.write_from_fd(fd, n, offset + done),
                ctx.should_stop, chunks.IO)
            if stopped:
                # A short READ could read as end of file to the guest's page cache: fail instead
                # (nobody receives this reply: the device is being reset).
                raise _stopped("READ")
            return total

    @_guard
    def write(self, ctx: Context, nodeid: int, fh: int, reader: Reader, size: int,
              offset: int, write_flags: int) -> int:
        size = _check_int(size, "size", 0, 0xFFFFFFFF)
        offset = _check_int(offset, "offset")
        with self._handles.pin(fh, nodeid) as h:
            # Privileges go before the data arrives, as in the VFS (file_remove_privs).
            if write_flags & abi.FUSE_WRITE_KILL_SUIDGID:
                self._kill_setid(h.fd, os.fstat(h.fd))
            self._kill_remapped_capability(h.fd)
            fd = h.fd
            # Stopped early, the count says what reached the file (a short write is legal).
            total, _stopped_early = chunks.run(
                size, lambda done, n: reader.read_to_fd(fd, n, offset + done),
                ctx.should_stop, chunks.IO)
            return total

    @_guard
    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        with self._handles.pin(fh, nodeid) as h:
            # close() of a duplicate runs the host filesystem's flush-on-close (e.g. NFS)
            # without giving up our handle.
            try:
                dup = os.dup(h.fd)
            except OSError as e:
                if e.errno not in _NO_FD_LEFT:
                    raise
                # No fd left for the duplicate: the guest's close() must still succeed. Writing
                # the data back is what a flush-on-close does at most, so do that instead.
                os.fdatasync(h.fd)
                return
            os.close(dup)

    @_guard
    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self._handles.remove(fh, nodeid, is_dir=False)
        if self.dax is not None:
            self.dax.drop_owner(fh)     # DAX mappings made through the handle die with it

    @_guard
    def setupmapping(self, ctx: Context, nodeid: int, fh: int, foffset: int, length: int,
                     flags: int, moffset: int) -> None:
        if self.dax is None:
            raise _err(errno.ENOSYS, "no DAX window")
        dax.setupmapping(self.dax, self, nodeid, fh, foffset, length, flags, moffset)

    @_guard
    def removemapping(self, ctx: Context, ranges: list[tuple[int, int]]) -> None:
        if self.dax is None:
            raise _err(errno.ENOSYS, "no DAX window")
        dax.removemapping(self.dax, ranges)

    @_guard
    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._handles.pin(fh, nodeid) as h:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    @_guard
    def fallocate(self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int,
                  length: int) -> None:
        mode = _check_int(mode, "mode", 0, 0xFFFFFFFF)
        offset = _check_int(offset, "offset")
        length = _check_int(length, "length", 1)
        with self._handles.pin(fh, nodeid) as h:
            fd = h.fd
            if mode & ~_SPLITTABLE_FALLOC:
                syscalls.fallocate(fd, mode, offset, length)
                return

            def piece(done: int, n: int) -> int:
                syscalls.fallocate(fd, mode, offset + done, n)
                return n

            # POSIX makes fallocate all or nothing, but a stop only comes with a device reset
            # (a crash, from the guest's side): the pieces done so far stay, as after a crash.
            _done, stopped = chunks.run(length, piece, ctx.should_stop, chunks.ALLOCATE)
            if stopped:
                raise _stopped("FALLOCATE")

    @_guard
    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise _err(errno.EINVAL, f"unsupported whence {whence!r}")
        offset = _check_int(offset, "offset", -OFFSET_MAX - 1)
        with self._handles.pin(fh, nodeid) as h:
            # The handle's file position is otherwise unused (all I/O is positional).
            return syscalls.lseek(h.fd, offset, whence)

    @_guard
    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        if flags != 0:
            raise _err(errno.EINVAL, "copy_file_range flags must be 0")
        off_in = _check_int(off_in, "off_in")
        off_out = _check_int(off_out, "off_out")
        length = min(_check_int(length, "length", 0, (1 << 64) - 1), 1 << 30)
        with self._handles.pin(fh_in, nodeid_in) as hin, \
                self._handles.pin(fh_out, nodeid_out) as hout:
            fd_in, fd_out = hin.fd, hout.fd
            # Stopped early, the count is what was copied: a short copy is a legal answer.
            copied, _stopped_early = chunks.run(
                length, lambda done, n: os.copy_file_range(fd_in, fd_out, n, off_in + done,
                                                           off_out + done),
                ctx.should_stop, chunks.COPY)
            return copied

    # ------------------------------------------------------------------ directories

    @_guard
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        with self._inodes.pin(nodeid) as inode:
            if not inode.is_dir:
                raise _err(errno.ENOTDIR)
            self._handles.check_room()
            fd = os.open(inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stream = DirStream(fd, self.options.readdir_buffer)
            return self._handles.add(nodeid, fd, True, stream), self._fopen_flags(True)

    def _dir_entries(self, nodeid: int, fh: int, offset: int
                     ) -> Generator[tuple[int, int, int, bytes], None, None]:
        """The handle's listing from `offset` (dirstream.py), with the handle pinned for as long
        as the listing is read. Closing this iterator closes the stream's, at the same entry."""
        with self._handles.pin(fh, nodeid, is_dir=True) as h:
            assert h.stream is not None
            with contextlib.closing(h.stream.entries(offset)) as entries:
                yield from entries

    def _check_dir_handle(self, nodeid: int, fh: int) -> None:
        """Unknown or not a directory handle: the error now, not at the first entry."""
        with self._handles.pin(fh, nodeid, is_dir=True):
            pass

    @_guard
    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        offset = _check_int(offset, "offset")
        self._check_dir_handle(nodeid, fh)
        return _guard_iter("readdir", self._iter_readdir(nodeid, fh, offset))

    def _iter_readdir(self, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        with contextlib.closing(self._dir_entries(nodeid, fh, offset)) as entries:
            for ino, off, dtype, name in entries:
                yield DirEntry(ino, off, dtype, name)

    @_guard
    def readdirplus(self, ctx: Context, nodeid: int, fh: int, offset: int
                    ) -> Iterator[tuple[DirEntry, Entry]]:
        offset = _check_int(offset, "offset")
        self._check_dir_handle(nodeid, fh)
        return _guard_iter("readdirplus", self._iter_readdirplus(nodeid, fh, offset))

    def _iter_readdirplus(self, nodeid: int, fh: int, offset: int
                          ) -> Iterator[tuple[DirEntry, Entry]]:
        """Lazily look up each entry, so that only entries the server pulls get a lookup count
        (the server forgets the last one if it does not fit, and the stream keeps it)."""
        sent = 0
        # nodeid 0 in a READDIRPLUS record means "no lookup for this name" (the guest lists the
        # name and looks it up later if it needs to), not "does not exist".
        no_lookup = Entry(nodeid=0, generation=0, attr=None, entry_timeout=0.0, attr_timeout=0.0)
        with contextlib.closing(self._dir_entries(nodeid, fh, offset)) as entries:
            for ino, off, dtype, name in entries:
                if name in (b".", b".."):
                    # The guest ignores these in READDIRPLUS.
                    yield DirEntry(ino, off, dtype, name), no_lookup
                    sent += 1
                    continue
                try:
                    with self._inodes.pin(nodeid) as p:
                        entry = self._do_lookup(p, check_name(name))
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        continue            # removed since the host listed it
                    if e.errno in _NO_FD_LEFT:
                        # No room for another node id (max_inodes) or fd: still list the name.
                        yield DirEntry(ino, off, dtype, name), no_lookup
                        sent += 1
                        continue
                    if sent == 0:
                        raise
                    # Stop here (this entry stays in the stream); the guest resumes at it and
                    # then sees the error.
                    logger.debug("readdirplus stops at %r: %s", name, e)
                    return
                st = entry.attr
                assert st is not None
                yield DirEntry(st.st_ino, off, _dt_from_mode(st.st_mode), name), entry
                sent += 1

    @_guard
    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        self._handles.remove(fh, nodeid, is_dir=True)

    @_guard
    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._handles.pin(fh, nodeid, is_dir=True) as h:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    @_guard
    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """syncfs(2) on every host file system of the share the guest has reached: the share's
        own, and each other one mounted below it that a known directory lives on (virtiofsd
        does the same for submounts). Never sync(2): other file systems are not the guest's."""
        for dir_id in self._inodes.one_dir_per_device():
            try:
                with self._inodes.pin(dir_id) as inode:
                    fd = os.open(inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.EBADF and dir_id != ROOT_ID:
                    continue  # forgotten meanwhile; its file system is synced through another
                raise
            try:
                syscalls.syncfs(fd)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ misc

    @_guard
    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        with self._inodes.pin(nodeid) as inode:
            return os.fstatvfs(inode.fd)

    @_guard
    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Emulated permission check for ctx (owner/group/other bits; uid 0 may do anything
        except execute a file with no x bit). Only sent when the guest mounts without
        default_permissions."""
        mask = _check_int(mask, "mask", 0, 0xFFFFFFFF)
        if mask & ~(os.R_OK | os.W_OK | os.X_OK):
            raise _err(errno.EINVAL)
        with self._inodes.pin(nodeid) as inode:
            st = os.fstat(inode.fd)
        if mask == os.F_OK:
            return
        if ctx.uid == 0:
            if mask & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise _err(errno.EACCES)
            return
        if st.st_uid == ctx.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == ctx.gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if mask & ~bits:
            raise _err(errno.EACCES)

    @staticmethod
    def _xattr_path(inode: Inode) -> str:
        """xattr syscalls do not accept O_PATH fds; the magic link reaches exactly the inode
        (for a symlink, FIFO, socket or device node too: the link is followed to that inode
        and no further, and nothing is opened), so the host answers as a local file system
        would (e.g. user.* on a symlink: EPERM to set, ENODATA to get)."""
        return inode.proc_path

    def _host_xattr_name(self, name: bytes, modifying: bool) -> bytes:
        host = self._xattrs.to_host(check_xattr_name(name))
        if host is None:
            # Refused by xattr_policy: it cannot be set, and reads as absent (the guest
            # kernel's own lookups, e.g. security.capability at exec, must not fail).
            raise _err(errno.EPERM if modifying else errno.ENODATA,
                       f"xattr {name[:64]!r} refused by xattr_policy")
        return host

    @_guard
    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        host = self._host_xattr_name(name, True)
        value = bytes(value)
        check_xattr_size(len(value))
        if flags not in (0, _XATTR_CREATE, _XATTR_REPLACE):
            raise _err(errno.EINVAL, "bad setxattr flags")
        with self._inodes.pin(nodeid) as inode:
            os.setxattr(self._xattr_path(inode), host, value, flags)

    @_guard
    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        host = self._host_xattr_name(name, False)
        size = _check_int(size, "size", 0, 0xFFFFFFFF)
        with self._inodes.pin(nodeid) as inode:
            value = os.getxattr(self._xattr_path(inode), host)
        if size == 0:
            return len(value)
        if len(value) > size:
            raise _err(errno.ERANGE)
        return value

    @_guard
    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        size = _check_int(size, "size", 0, 0xFFFFFFFF)
        with self._inodes.pin(nodeid) as inode:
            names = os.listxattr(self._xattr_path(inode))
        data = self._xattrs.guest_list([os.fsencode(n) for n in names])
        if size == 0:
            return len(data)
        if len(data) > size:
            raise _err(errno.ERANGE)
        return data

    @_guard
    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        host = self._host_xattr_name(name, True)
        with self._inodes.pin(nodeid) as inode:
            os.removexattr(self._xattr_path(inode), host)

__all__ = ["PassthroughFs", "ROOT_ID"]
