"""Configuration of one virtio-fs shared directory.

`FsOptions` is the single place where the user-facing knobs of a shared directory are checked.
It validates eagerly (in ``__post_init__``) so that a bad command line or config file fails when
the VM is being built, with a message naming the field, rather than later inside a worker thread
where the only symptom would be a guest that cannot mount.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

#: Maximum length of the virtio-fs tag in bytes (virtio_fs_config.tag[36]).
FS_MAX_TAG_LEN = 36


def check_tag(tag: object) -> None:
    """The virtio-fs tag rule (ValueError otherwise): it is copied into virtio_fs_config.tag[36] and
    the guest mounts by it. Shared by FsOptions and the vhost-user-fs front-end's options."""
    if not isinstance(tag, str):
        raise ValueError(f"tag must be a string, got {tag!r}")
    try:
        tag_bytes = tag.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"tag must be valid UTF-8: {exc}") from None
    if not 1 <= len(tag_bytes) <= FS_MAX_TAG_LEN:
        raise ValueError(
            f"tag must be 1..{FS_MAX_TAG_LEN} bytes of UTF-8, got {len(tag_bytes)} bytes")
    if "\0" in tag:
        # The guest reads the tag up to the first NUL; an embedded one silently truncates it.
        raise ValueError("tag must not contain NUL characters")

#: Accepted cache policies (same meaning as crosvm's ``cache=``).
CACHE_POLICIES = ("never", "auto", "always")

#: What happens to guest xattr names that would change what the host kernel enforces
#: (``security.*``, ``trusted.*``, ``system.*``; see devices/virtio/fs/policy.py):
#: ``remap`` stores them under a private ``user.virtiofs.`` prefix (the default: the guest keeps
#: working and reads back what it set, the host ignores them), ``refuse`` answers EPERM,
#: ``passthrough`` sets them on the host as they are.
XATTR_POLICIES = ("remap", "refuse", "passthrough")

# Resource limits of one device (README "Resource limits"). Each bounds host memory and host fds a
# guest can make the device hold; past a limit the guest gets an errno for that request only.
#: Node ids the guest may know at once: each holds one O_PATH fd and ~0.4 KiB of host heap.
DEFAULT_MAX_INODES = 16384
#: Open files and directories at once: each holds one fd and ~0.4 KiB (plus a directory's
#: ``readdir_buffer`` while a listing is in progress).
DEFAULT_MAX_HANDLES = 1024
#: Bytes of getdents64 records a directory handle may keep between two READDIRs (the entries read
#: from the host but not yet sent), so that a guest reading on resumes without a seek.
DEFAULT_READDIR_BUFFER = 4096
#: Largest READ/WRITE/READDIR payload per request (FUSE's max_write, announced at INIT): the bytes
#: one request can hold in flight. Linux 6.1 guests use at most 1 MiB (FUSE_MAX_MAX_PAGES).
DEFAULT_MAX_WRITE = 1 << 20
#: Host heap one known node id costs at most (measured: ~400 B; tests/test_fs_limits.py).
BYTES_PER_INODE = 512
#: Host heap one open handle costs at most besides a directory's readdir_buffer (~220 B measured).
BYTES_PER_HANDLE = 512
#: Heap of an idle device (tables, session, counters), bounded generously.
DEVICE_BASE_BYTES = 1 << 20
#: Bounds of each limit: (lowest, highest) accepted.
LIMIT_RANGES = {
    "max_inodes": (16, 1 << 24),
    "max_handles": (16, 1 << 22),
    "readdir_buffer": (1024, 1 << 20),
    "max_write": (4096, 1 << 20),
}


#: DAX window size in MiB by default (crosvm's default cache size is 8 GiB on PCI; 1 GiB here). It
#: costs the host address space only, the guest 16 KiB of struct pages per MiB at boot.
DEFAULT_DAX_WINDOW_MIB = 1024
#: Bounds of dax_window_mib; it must be a multiple of 2 (Linux maps DAX in 2 MiB chunks and
#: hot-plugs the window's struct pages in 2 MiB subsections).
DAX_WINDOW_MIB_RANGE = (2, 1 << 16)


def check_dax_window_mib(value: object) -> None:
    lo, hi = DAX_WINDOW_MIB_RANGE
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"dax_window_mib must be an integer, got {value!r}")
    if not lo <= value <= hi or value % 2:
        raise ValueError(f"dax_window_mib must be an even number between {lo} and {hi}, got {value}")
#: Where a shared directory's device runs (the jail modes of devices/jail, plus `none`).
SANDBOX_MODES = ("namespace", "chroot", "none")


#: Timeouts at or above this are refused rather than silently capped (FUSE carries validity as
#: u64 seconds; nobody means 300 billion years).
MAX_SECONDS = 2.0 ** 63


def check_seconds(value: object) -> float:
    """The one rule for a timeout given in seconds, as a float: a finite number >= 0.

    Used for every FUSE validity option here and for the VM's own timeouts in ``vmm.config``.
    The ValueError's message does not name the option; callers prefix it.
    """
    # bool is an int subclass; "timeout=True" is almost certainly a config mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number of seconds >= 0, got {value}")
    if value >= MAX_SECONDS:
        raise ValueError(f"is too large ({value})")
    return value


def _seconds_field(field: str, value: object) -> float:
    try:
        return check_seconds(value)
    except ValueError as exc:
        raise ValueError(f"{field} {exc}") from None


@dataclass(frozen=True)
class FsOptions:
    """Options of one shared directory (see spec.md, "virtio").

    ``source`` is stored as an absolute path (a relative one is resolved against the current
    directory once, here, so that later chdirs cannot change what is shared).
    """

    source: str                    # host directory (absolute)
    tag: str                       # <= 36 bytes UTF-8
    num_request_queues: int = 1
    cache: str = "auto"            # never | auto | always
    timeout: float = 1.0           # entry/attr validity seconds for positive entries
    negative_timeout: float = 0.0  # 0 = reply -ENOENT; > 0 = reply nodeid 0 with entry_valid = this
    writeback: bool = False
    trace: bool = False            # JSON-lines trace of every request
    trace_path: str | None = None
    # Policies that keep a hostile guest from changing what the host enforces (README, "Host
    # safety policies"); each option restores exact POSIX behaviour for a trusted guest.
    allow_setid: bool = False      # set-uid/set-gid bits on new entries and chmod (files)
    allow_mknod: bool = False      # character/block device nodes (MKNOD, RENAME_WHITEOUT)
    xattr_policy: str = "remap"    # remap | refuse | passthrough (see XATTR_POLICIES)
    allow_selinux_xattr: bool = False  # security.selinux goes to the host as it is
    max_inodes: int = DEFAULT_MAX_INODES          # node ids known at once (ENFILE beyond)
    max_handles: int = DEFAULT_MAX_HANDLES        # open files + directories (EMFILE beyond)
    readdir_buffer: int = DEFAULT_READDIR_BUFFER  # bytes kept per directory handle
    max_write: int = DEFAULT_MAX_WRITE            # bytes per READ/WRITE/READDIR request
    # DAX window (devices/virtio/fs/dax.py): file data mapped into guest memory, no READ/WRITE.
    dax: bool = False
    dax_window_mib: int = DEFAULT_DAX_WINDOW_MIB  # guest-physical window size (address space only)
    # crosvm's remaining fs options (issue 12; README "Device options"): each checked in
    # _check_crosvm_options, implemented in its own module (casefold.py, idmap.py, secctx.py).
    ascii_casefold: bool = False   # names match ignoring ASCII case (casefold.py)
    posix_acl: bool = True         # FUSE_POSIX_ACL: the guest enforces POSIX ACLs (policy.py)
    uidmap: str | None = None      # "inner outer count[,...]" guest uid -> host uid (idmap.py)
    gidmap: str | None = None      # the same for gids
    idmap: str = "auto"            # auto | userns | device: where the maps apply (idmap.py)
    security_ctx: bool = False     # FUSE_SECURITY_CTX; refused where fscreate is not writable
    # Where the device runs (README "Sandbox"): a jailed vhost-user back-end child of the VMM
    # (namespace: pivot_root into the share; chroot), or `none`: a worker thread of the VMM.
    sandbox: str = "namespace"

    def __post_init__(self) -> None:
        # source
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source must be a non-empty path string, got {self.source!r}")
        if "\0" in self.source:
            raise ValueError("source must not contain NUL characters")
        source = os.path.abspath(self.source)
        if not os.path.isdir(source):
            raise ValueError(f"source {self.source!r} is not an existing directory")
        object.__setattr__(self, "source", source)

        check_tag(self.tag)

        # num_request_queues
        if isinstance(self.num_request_queues, bool) or not isinstance(self.num_request_queues, int):
            raise ValueError(
                f"num_request_queues must be an integer, got {self.num_request_queues!r}")
        if self.num_request_queues < 1:
            raise ValueError(f"num_request_queues must be >= 1, got {self.num_request_queues}")

        # cache
        if self.cache not in CACHE_POLICIES:
            raise ValueError(
                f"cache must be one of {'|'.join(CACHE_POLICIES)}, got {self.cache!r}")

        # timeouts
        object.__setattr__(self, "timeout", _seconds_field("timeout", self.timeout))
        object.__setattr__(self, "negative_timeout",
                           _seconds_field("negative_timeout", self.negative_timeout))

        if self.xattr_policy not in XATTR_POLICIES:
            raise ValueError(f"xattr_policy must be one of {'|'.join(XATTR_POLICIES)}, "
                             f"got {self.xattr_policy!r}")

        # flags
        for field in ("writeback", "trace", "allow_setid", "allow_mknod", "allow_selinux_xattr"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if self.trace_path is not None and (not isinstance(self.trace_path, str)
                                            or not self.trace_path):
            raise ValueError(f"trace_path must be a non-empty string or None, got {self.trace_path!r}")

        # resource limits
        for field, (lo, hi) in LIMIT_RANGES.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise ValueError(f"{field} must be between {lo} and {hi}, got {value}")
        if self.max_write % 4096:
            raise ValueError(f"max_write must be a multiple of 4096, got {self.max_write}")

        if self.sandbox not in SANDBOX_MODES:
            raise ValueError(f"sandbox must be one of {'|'.join(SANDBOX_MODES)}, got {self.sandbox!r}")
        # dax works with every sandbox mode: a jailed back-end maps into the VMM's window over the
        # vhost-user back-end request channel (devices/virtio/vhost_user/backend_req.py).
        # DAX window
        if not isinstance(self.dax, bool):
            raise ValueError(f"dax must be a bool, got {self.dax!r}")
        check_dax_window_mib(self.dax_window_mib)
        if not self.dax and self.dax_window_mib != DEFAULT_DAX_WINDOW_MIB:
            raise ValueError("dax_window_mib is set but dax is false (the window exists only with dax: true)")
        self._check_crosvm_options()

    def _check_crosvm_options(self) -> None:
        """ascii_casefold, posix_acl, uidmap/gidmap, security_ctx (one block: issue 12)."""
        for field in ("ascii_casefold", "posix_acl", "security_ctx"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if self.ascii_casefold and self.negative_timeout > 0:
            # A guest negative dentry is per spelling: "FOO" cached as missing would hide a
            # "foo" created afterwards, for negative_timeout seconds (casefold.py).
            raise ValueError("negative_timeout must be 0 with ascii_casefold (a cached miss of "
                             "one spelling would hide a file created under another)")
        from . import idmap, secctx   # late: both import nothing from here, keep it that way
        for field in ("uidmap", "gidmap"):
            value = getattr(self, field)
            if value is not None:
                try:
                    idmap.IdMap.parse(value)
                except ValueError as exc:
                    raise ValueError(f"{field} {exc}") from None
        if self.idmap not in idmap.IDMAP_MODES:
            raise ValueError(f"idmap must be one of {'|'.join(idmap.IDMAP_MODES)}, "
                             f"got {self.idmap!r}")
        if self.idmap == "userns":
            if self.uidmap is None and self.gidmap is None:
                raise ValueError("idmap: userns needs a uidmap or gidmap")
            why = idmap.userns_obstacle(self.uidmap, self.gidmap, self.sandbox, self.allow_mknod)
            if why:
                raise ValueError(f"idmap: userns is not possible: {why}")
        if self.security_ctx:
            why = secctx.unsupported_reason()
            if why:
                raise ValueError(f"security_ctx cannot be enabled on this host: {why}")

    @property
    def memory_ceiling(self) -> int:
        """Bytes of host heap this share may make the VMM hold at most, whatever the guest does:
        every node id and handle the limits allow (a directory handle with a full readdir
        buffer), plus the request in flight on each queue (its reply is built once and copied
        once: 2 x max_write). With the defaults: 15.5 MiB. Kernel memory for the fds (about
        1 KiB per open file) comes on top; README "Resource limits"."""
        return (DEVICE_BASE_BYTES + self.max_inodes * BYTES_PER_INODE
                + self.max_handles * (BYTES_PER_HANDLE + self.readdir_buffer)
                + self.num_request_queues * 2 * (self.max_write + self.readdir_buffer))

    @property
    def positive_timeout(self) -> float:
        """Entry/attr validity for positive replies: ``timeout``, or 0 when ``cache == "never"``."""
        return 0.0 if self.cache == "never" else self.timeout
