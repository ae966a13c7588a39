"""JailSpec: the declarative description of one jail (what the config's ``sandbox:`` becomes)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import capabilities, policy
from .seccomp import ACTIONS, Rule

MODES = ("namespace", "chroot", "none")


class JailError(RuntimeError):
    """The jail could not be set up (or a jailed child reported that it could not)."""


@dataclass(frozen=True)
class JailSpec:
    """What to isolate and what to leave the jailed process.

    mode:
        ``namespace`` new mount/PID/IPC/UTS/network namespaces + pivot_root into `root`;
        ``chroot`` the same namespaces + chroot (for hosts where pivot_root cannot work);
        ``none`` no namespaces and no change of root (capabilities, no_new_privs and seccomp
        still apply as configured; ``JailSpec.unconfined()`` switches them off too).
    root: the shared directory that becomes "/" (required unless mode is ``none``).
    keep_caps: capability names kept (default: the fs device's set, see capabilities.py);
        ``None`` keeps every capability (and skips the securebits).
    allow_mknod / allow_setfcap: add CAP_MKNOD / CAP_SETFCAP (device nodes, file capabilities).
    seccomp_action: default action for a call outside the allowlist: ``errno`` (EPERM),
        ``kill`` (SIGSYS, whole process), ``log`` (allowed, logged by the kernel) or ``None``
        (no filter at all).
    syscalls: the allowlist (name -> rule); default: ``policy.FS_DEVICE``.
    max_open_files: RLIMIT_NOFILE for the jailed process (``None``: unchanged).
    keep_fds: file descriptors that survive (0, 1, 2 always do); every other fd is closed,
        and a kept fd may not be a directory, since a directory fd would lead out of the jail.
    hostname: the new UTS namespace's host name.
    uid_map / gid_map: ``((inner, outer, count), ...)`` (the lines of ``/proc/PID/uid_map``): the
        jailed process gets a new user namespace with these maps (a missing one is the identity)
        and runs as its uid/gid 0, which must be mapped (userns.py); ``None`` for both: no user
        namespace, the process stays host root with reduced capabilities.
    """

    root: str | None = None
    mode: str = "namespace"
    keep_caps: frozenset[str] | None = capabilities.FS_DEVICE_CAPS
    allow_mknod: bool = False
    allow_setfcap: bool = False
    seccomp_action: str | None = "errno"
    syscalls: Mapping[str, Rule] | None = None
    max_open_files: int | None = None
    keep_fds: tuple[int, ...] = ()
    hostname: str = "pyvmm-jail"
    no_new_privs: bool = field(default=True)
    uid_map: tuple[tuple[int, int, int], ...] | None = None
    gid_map: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sandbox mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode != "none":
            if not self.root:
                raise ValueError(f"sandbox mode {self.mode!r} needs a root directory")
            if not os.path.isdir(self.root):
                raise ValueError(f"jail root {self.root!r} is not a directory")
        if self.seccomp_action is not None and self.seccomp_action not in ACTIONS:
            raise ValueError(f"seccomp_action must be one of {', '.join(ACTIONS)} or None, "
                             f"not {self.seccomp_action!r}")
        if self.keep_caps is not None:
            capabilities.mask_of(self.keep_caps)          # unknown names fail here
        if self.max_open_files is not None and not 16 <= self.max_open_files <= 1 << 20:
            raise ValueError(f"max_open_files {self.max_open_files} outside 16..{1 << 20}")
        if any(not isinstance(fd, int) or fd < 0 for fd in self.keep_fds):
            raise ValueError(f"keep_fds must be non-negative ints: {self.keep_fds!r}")
        if self.seccomp_action is not None and not self.no_new_privs:
            # Without no_new_privs the kernel takes a filter only from CAP_SYS_ADMIN, which the
            # jail has just dropped.
            raise ValueError("a seccomp filter needs no_new_privs")

        if self.userns:
            if self.mode == "none":
                raise ValueError("a user namespace (uid_map/gid_map) needs mode namespace or chroot")
            for kind, ranges in (("uid_map", self.uid_map), ("gid_map", self.gid_map)):
                if ranges is not None:
                    _check_ranges(kind, ranges)

    @property
    def userns(self) -> bool:
        return self.uid_map is not None or self.gid_map is not None

    @classmethod
    def unconfined(cls) -> JailSpec:
        """``sandbox: none``: nothing at all is changed."""
        return cls(mode="none", keep_caps=None, seccomp_action=None, no_new_privs=False)

    def caps_mask(self) -> int | None:
        if self.keep_caps is None:
            return None
        extra = set()
        if self.allow_mknod:
            extra.add("MKNOD")
        if self.allow_setfcap:
            extra.add("SETFCAP")
        return capabilities.mask_of(set(self.keep_caps) | extra)

    def allowlist(self) -> Mapping[str, Rule]:
        return policy.FS_DEVICE if self.syscalls is None else self.syscalls

    def maps(self) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
        """(uid_map, gid_map) to write, a missing one as the identity."""
        from .userns import IDENTITY
        return self.uid_map or IDENTITY, self.gid_map or IDENTITY

    def real_root(self) -> str:
        assert self.root is not None
        return os.path.realpath(self.root)


#: The kernel takes at most this many lines per map (since 4.15).
MAX_MAP_RANGES = 340


def _check_ranges(kind: str, ranges: tuple[tuple[int, int, int], ...]) -> None:
    """What the kernel would refuse, said before any process is forked; and the jailed process
    becomes the namespace's 0, so 0 must be mapped."""
    if not 1 <= len(ranges) <= MAX_MAP_RANGES:
        raise ValueError(f"{kind} must have 1..{MAX_MAP_RANGES} ranges, got {len(ranges)}")
    for r in ranges:
        if (len(r) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                or r[2] < 1 or r[0] < 0 or r[1] < 0
                or r[0] + r[2] > 0xFFFFFFFF or r[1] + r[2] > 0xFFFFFFFF):
            raise ValueError(f"{kind} range {r!r} is not (inner, outer, count) within 32 bits")
    if not any(inner == 0 for inner, _outer, _count in ranges):
        raise ValueError(f"{kind} must map id 0 (the jailed device runs as the namespace's 0)")
