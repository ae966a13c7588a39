"""The jail a device process runs in (crosvm keeps this as its own ``jail`` crate).

Design: a virtio-fs device is served by a child process of the VMM (a vhost-user backend on a
socketpair), and that child is jailed just before it starts serving, so that even a bug in the
passthrough's name checks cannot reach the host:

* **namespaces** (namespaces.py): new mount, PID, IPC, UTS and network namespaces; the jailed
  process is PID 1 of its PID namespace and has only a loopback interface (down).
* **file system view**: mount propagation made slave, then ``pivot_root`` into the shared
  directory (virtiofsd's ``pivot_root(".", ".")`` + ``umount2(".", MNT_DETACH)``), so "/" *is*
  the share and the host tree is not mounted at all; ``chroot`` mode for hosts where pivot_root
  cannot work. The jail's view of the share is nosuid, nodev, noexec.
* **/proc after pivot_root**: a private, read-only, ``subset=pid`` procfs of the new PID
  namespace is mounted, kept as an O_PATH fd and detached; the process's cwd is left on it, so
  ``self/fd/N`` (relative) reopens fd N as ``/proc/self/fd/N`` does outside the jail. The
  passthrough's one hook for this is ``devices.virtio.fs.inodes.set_proc_root(jail.proc_root)``.
* **fds**: every fd not explicitly kept is closed; a kept directory fd is refused.
* **rlimits**: RLIMIT_NOFILE as configured, no core dumps, not dumpable (guest memory is mapped
  into the process).
* **capabilities** (capabilities.py): only CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID
  (+ MKNOD / SETFCAP when the config allows device nodes / file capabilities); bounding and
  ambient sets emptied likewise, securebits locked.
* **user namespace** (userns.py), only with ``uid_map``/``gid_map``: the maps are written from
  outside by a helper that stays root in the initial namespace; the process then runs as the
  namespace's 0 with no supplementary groups, so it holds only the mapped host ids and its
  capabilities act only on inodes whose owner and group are mapped.
* **no_new_privs**, then **seccomp** last (seccomp.py, policy.py): an allowlist compiled to a
  BPF binary search; foreign architectures kill the process, x32 numbers and anything unlisted
  get the default action (EPERM, or SIGSYS with ``seccomp_action="kill"``).

Entry points: ``spawn_jailed(target, spec)`` forks a jailed child and returns a ``JailedChild``
handle (pid, pidfd for epoll, wait/kill); ``enter(spec)`` jails the calling process (for a
backend started as its own program). ``JailSpec`` is the declarative description. Nothing here
knows about the VMM, the device or the config: a later phase maps ``sandbox:`` onto a JailSpec.
"""

from __future__ import annotations

from .process import Jail, JailedChild, enter, spawn_jailed
from .spec import MODES, JailError, JailSpec
from .userns import UserNamespaceUnavailable

__all__ = ["Jail", "JailError", "JailSpec", "JailedChild", "MODES", "UserNamespaceUnavailable",
           "enter", "spawn_jailed"]
