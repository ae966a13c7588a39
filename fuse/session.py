"""FUSE session state: INIT negotiation, the INIT flag masks, and the end of a session.

A session runs from an INIT to a DESTROY, a second INIT (a rebooted or remounted guest kernel) or a
device reset.  :class:`Session` is the one owner of that lifecycle: it is the only caller of
``FileSystem.init()`` and ``FileSystem.destroy()``, and the only place INIT flags are masked, so
a filesystem states what it supports and never has to reset or mask anything itself.

Negotiation (fs/fuse/inode.c ``process_init_reply`` is the other side): the enabled flags are
``guest-capable & (SERVER_FLAGS | (filesystem-wanted & FS_NEGOTIABLE_FLAGS))``.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading

from . import abi
from .encode import U32
from .filesystem import FileSystem, InitReply
from .limits import RequestError
from .logthrottle import LogThrottle

logger = logging.getLogger(__name__)

#: Guest page size; used to size max_pages (x86-64 guests only).
PAGE_SIZE = 4096

#: Flags the server itself implements and offers whenever the guest is capable.
SERVER_FLAGS = (
    abi.FUSE_ASYNC_READ
    | abi.FUSE_BIG_WRITES
    | abi.FUSE_PARALLEL_DIROPS
    | abi.FUSE_MAX_PAGES
    | abi.FUSE_INIT_EXT
)
#: Flags a filesystem may ask for in ``init``: the server can carry what they imply.  Anything
#: else (locks, ioctl, DAX, security contexts, splice) needs wire support we do not have and is
#: never advertised, whatever the filesystem asks.  HANDLE_KILLPRIV_V2 is carried: the kill
#: requests reach the filesystem as FUSE_WRITE_KILL_SUIDGID (write_flags),
#: FUSE_OPEN_KILL_SUIDGID (open/create ``open_flags``) and FATTR_KILL_SUIDGID (setattr).
FS_NEGOTIABLE_FLAGS = (
    SERVER_FLAGS
    | abi.FUSE_DO_READDIRPLUS
    | abi.FUSE_READDIRPLUS_AUTO
    | abi.FUSE_ATOMIC_O_TRUNC
    | abi.FUSE_EXPORT_SUPPORT
    | abi.FUSE_DONT_MASK
    | abi.FUSE_AUTO_INVAL_DATA
    | abi.FUSE_ASYNC_DIO
    | abi.FUSE_WRITEBACK_CACHE
    | abi.FUSE_NO_OPEN_SUPPORT
    | abi.FUSE_HANDLE_KILLPRIV
    | abi.FUSE_HANDLE_KILLPRIV_V2
    | abi.FUSE_POSIX_ACL
    | abi.FUSE_ABORT_ERROR
    | abi.FUSE_CACHE_SYMLINKS
    | abi.FUSE_NO_OPENDIR_SUPPORT
    | abi.FUSE_EXPLICIT_INVAL_DATA
    | abi.FUSE_SUBMOUNTS
    | abi.FUSE_SETXATTR_EXT
    | abi.FUSE_MAP_ALIGNMENT     # DAX: the filesystem has a window (fuse.mapping ops)
)

_INIT_IN_COMPAT = struct.Struct("<4I")  # major, minor, max_readahead, flags (FUSE < 7.36)


def max_pages_for(max_write: int) -> int:
    """fuse_init_out.max_pages for a server accepting ``max_write`` bytes per WRITE."""
    return min(0xFFFF, -(-max_write // PAGE_SIZE))


class Session:
    """Negotiated state of the current session; safe to use from several queue workers."""

    def __init__(self, fs: FileSystem, max_write: int, log: LogThrottle | None = None) -> None:
        self.fs = fs
        #: Every INIT, DESTROY and their failures are guest-caused: their log lines are sampled.
        self._log = log or LogThrottle(logger)
        self.max_write = max_write
        self._lock = threading.Lock()
        self.initialized = False
        self.minor = 0
        self.flags = 0  # enabled INIT flags, 64 bits

    def init(self, body: bytes) -> bytes:
        """Negotiate from a fuse_init_in (``body``, 16 or 64 bytes); returns fuse_init_out.

        A guest speaking a newer major gets our version only (it may retry with it); an older
        one, or a filesystem that refuses, leaves no session.
        """
        if len(body) < abi.FUSE_COMPAT_INIT_IN_SIZE:
            raise RequestError(errno.EINVAL, f"fuse_init_in of {len(body)} bytes")
        major, minor, max_readahead, flags = _INIT_IN_COMPAT.unpack_from(body)
        if major < abi.FUSE_KERNEL_VERSION:
            raise RequestError(errno.EPROTO, f"guest FUSE major {major}")
        if major > abi.FUSE_KERNEL_VERSION:
            self._log.warn("INIT: guest FUSE major %d, answering 7.%d", major,
                           abi.FUSE_KERNEL_MINOR_VERSION)
            return abi.INIT_OUT.pack(major=abi.FUSE_KERNEL_VERSION,
                                     minor=abi.FUSE_KERNEL_MINOR_VERSION)
        if minor < abi.FUSE_MIN_MINOR_VERSION:
            raise RequestError(errno.EPROTO,
                               f"guest FUSE 7.{minor} < 7.{abi.FUSE_MIN_MINOR_VERSION}")
        capable = flags
        if flags & abi.FUSE_INIT_EXT:
            if len(body) < abi.INIT_IN.size:
                raise RequestError(errno.EINVAL, "FUSE_INIT_EXT without flags2")
            capable |= abi.INIT_IN.unpack(body).flags2 << 32

        with self._lock:
            if self.initialized:
                self._log.log(logging.INFO, "INIT on an initialized session: destroying the "
                              "previous one")
                self._end_locked()
            reply = self.fs.init(capable)
            if not isinstance(reply, InitReply) or not isinstance(reply.flags, int):
                raise TypeError(f"init() returned {reply!r}, not InitReply")
            enabled = capable & (SERVER_FLAGS | (reply.flags & FS_NEGOTIABLE_FLAGS))
            if enabled & abi.FUSE_WRITEBACK_CACHE:
                # With a writeback cache the guest cannot rely on the server to kill suid bits.
                enabled &= ~abi.FUSE_HANDLE_KILLPRIV
            if not enabled & abi.FUSE_INIT_EXT:
                enabled &= U32
            minor_out = min(minor, abi.FUSE_KERNEL_MINOR_VERSION)
            out = abi.INIT_OUT.pack(
                major=abi.FUSE_KERNEL_VERSION, minor=minor_out, max_readahead=max_readahead,
                flags=enabled & U32, max_background=0xFFFF, congestion_threshold=49149,
                max_write=self.max_write, time_gran=1, max_pages=max_pages_for(self.max_write),
                map_alignment=reply.map_alignment if enabled & abi.FUSE_MAP_ALIGNMENT else 0,
                flags2=enabled >> 32)
            self.minor = minor_out
            self.flags = enabled
            self.initialized = True
        self._log.log(logging.INFO, "FUSE session 7.%d: flags %#x (guest %#x, fs wants %#x), "
                      "max_write %d", minor_out, enabled, capable, reply.flags, self.max_write)
        return out

    def end(self) -> None:
        """End the session (FUSE_DESTROY, device reset): the filesystem releases everything.

        Always calls ``destroy()``, even before any INIT: a filesystem may hold resources from
        its construction (the passthrough's root fd) that a reset must release too.
        """
        with self._lock:
            self._end_locked()

    def _end_locked(self) -> None:
        self.initialized = False
        self.flags = 0
        try:
            self.fs.destroy()
        except Exception as e:  # noqa: BLE001 - the guest is going away either way
            self._log.warn("destroy failed: %s", e)
