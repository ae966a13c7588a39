"""A user namespace around the jailed device, with uid/gid maps (crosvm's ``uidmap``/``gidmap``).

Why: a jailed device otherwise stays host uid 0 with a few capabilities, so a compromised device
can still act as *any* host user inside the share (chown to anyone, read any file through
CAP_DAC_OVERRIDE). In a user namespace whose ``uid_map``/``gid_map`` are the share's maps, the
device's capabilities count only for inodes whose owner and group are mapped, it switches to the
namespace's uid/gid 0 (a mapped, normally unprivileged host id) and drops its supplementary
groups, so it holds exactly the mapped host ids; the kernel translates ids in both directions
(stat shows an unmapped owner as the overflow id, chown to an unmapped id is EINVAL, a creation
by an unmapped caller is EOVERFLOW).

The handshake: arbitrary maps can only be written by a process with CAP_SETUID/CAP_SETGID in the
*parent* user namespace (user_namespaces(7)), never by the namespace's own members. So before
the jailing process unshares, it forks a :class:`MapWriter`, which stays root in the initial
namespace; after ``unshare(CLONE_NEWUSER | ...)`` the jailing process tells it to go, it writes
``/proc/PID/gid_map`` and ``uid_map`` of its parent (``setgroups`` is left ``allow``: the writer
is privileged, and the device needs ``setgroups([])`` to shed root's supplementary groups) and
exits; its exit status and one error line say whether that worked. This keeps the handshake
inside the jail package: the VMM, the standalone back-end and ``spawn_jailed`` all get it.

Order inside the namespace (process.py): the mounts, pivot_root and the private procfs happen
while the process is still host uid 0 (owner bits of root-owned directories on the way to the
share still apply to it; its capabilities there would not), then :func:`become` switches to the
namespace's ids, then capabilities are dropped as usual (now relative to the new namespace).
"""

from __future__ import annotations

import os
import signal

from . import _sys
from .spec import JailError

#: One map line: (first id inside, first id outside, count), as /proc/PID/uid_map takes it.
IdRanges = tuple[tuple[int, int, int], ...]
#: Every id unchanged: what a map the share does not give means (the initial namespace's map).
IDENTITY: IdRanges = ((0, 0, 0xFFFFFFFF),)


class UserNamespaceUnavailable(JailError):
    """The kernel would not make a user namespace (no CONFIG_USER_NS, user.max_user_namespaces
    exhausted or 0, a container's seccomp filter...); nothing has changed in the caller."""


def map_text(ranges: IdRanges) -> bytes:
    """The bytes to write to uid_map/gid_map (one ``inner outer count`` line per range)."""
    return b"".join(f"{a} {b} {c}\n".encode() for a, b, c in ranges)


class MapWriter:
    """A helper forked *before* the unshare: root in the initial user namespace, it writes the
    maps of its parent once told to (see the module docstring)."""

    def __init__(self, uid_map: IdRanges, gid_map: IdRanges) -> None:
        self.target = os.getpid()
        go_r, self._go = os.pipe2(os.O_CLOEXEC)
        self._err, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:                                          # the writer
            code = 1
            try:
                os.close(self._go)
                os.close(self._err)
                _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() == self.target and os.read(go_r, 1) == b"g":
                    code = _write_maps(self.target, uid_map, gid_map, err_w)
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(err_w)
        self.pid = pid

    def write(self) -> None:
        """Let the writer write the maps (the caller has unshared by now) and wait for it."""
        try:
            os.write(self._go, b"g")
        except OSError:
            pass                                               # it died: its status says so
        os.close(self._go)
        _, status = os.waitpid(self.pid, 0)
        reason = os.read(self._err, 4096).decode(errors="replace").strip()
        os.close(self._err)
        if os.waitstatus_to_exitcode(status) != 0:
            raise JailError(f"user namespace: {reason or 'the map writer failed'}")

    def abandon(self) -> None:
        """The unshare failed: end the writer without letting it write anything."""
        os.close(self._go)                                     # EOF: it exits without writing
        os.waitpid(self.pid, 0)
        os.close(self._err)


def _write_maps(pid: int, uid_map: IdRanges, gid_map: IdRanges, err_fd: int) -> int:
    for kind, ranges in (("gid", gid_map), ("uid", uid_map)):
        path = f"/proc/{pid}/{kind}_map"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                data = map_text(ranges)
                if os.write(fd, data) != len(data):     # the kernel takes a map in one write
                    raise OSError(f"short write to {path}")
            finally:
                os.close(fd)
        except OSError as exc:
            os.write(err_fd, f"writing {path} ({map_text(ranges).decode().strip()!r}): "
                             f"{exc}".replace("\n", "; ").encode())
            return 1
    return 0


def become(uid: int, gid: int) -> None:
    """Switch the calling process (inside its new, mapped user namespace) to ``uid``/``gid`` of
    that namespace, with no supplementary groups: from here on it holds only mapped host ids.

    Its capabilities survive the switch (they were never the host's: capabilities of a user
    namespace belong to whoever is in it, see capabilities(7), "effect of user ID changes": the
    old ids are host uid 0, which is not this namespace's root, so nothing is cleared)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise JailError(f"user namespace: could not become {uid}:{gid} without groups")
