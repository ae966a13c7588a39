"""The seccomp allowlist of a jailed fs device (reviewed; the one place to extend it).

How it was derived: ``tests/jail_workload.py`` runs what a jailed backend runs (every FUSE opcode
through ``fuse.Server`` + ``PassthroughFs``, the virtio-fs device with its worker thread, a
vhost-user style exchange: memfd and eventfds received with SCM_RIGHTS, mmap, epoll, replies on
the socket, plus threads and a log line). ``python tests/jail_workload.py --strace`` lists every
system call it makes after a start marker (CPython 3.11, glibc 2.36, Linux 6.x) and what this
policy lacks; each group below names what needs it. Calls *not* seen in that run but kept on
review are marked "(review)": the forms libc or CPython use on another path for the same job.
Then ``tests/test_jail.py`` runs the same workload jailed with ``seccomp_action="kill"``: one call
outside this list kills it and fails the test. (Unfiltered, strace shows ``clone3`` for threads;
under the filter clone3 answers ENOSYS and glibc uses ``clone``, which the kill-mode run covers.)

Result of the last derivation: 68 calls seen, 90 in the policy (added on review: 8 for creating as
the guest caller and remapped capabilities, prlimit64 and truncate for the resource limits, all
issue 11; prctl PR_SET_NAME for the worker's thread name, issue 9; pipe2 for the back-end
server's wake pipe, the sandboxed device).

To extend: add the call to the group that needs it (or a new group saying why), run the
workload with ``--strace`` and the jail tests. ``NEVER`` lists calls a jailed device must not make
whatever a future workload wants; a test keeps them out of ``FS_DEVICE``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ._sys import PR_SET_NAME
from .seccomp import ArgIn, ArgMaskEq, Errno, Rule

# clone(2) flags a thread has and a new process does not (sched.h)
CLONE_FS = 0x00000200
CLONE_VM = 0x00000100
CLONE_SIGHAND = 0x00000800
CLONE_THREAD = 0x00010000
THREAD_CLONE_FLAGS = CLONE_VM | CLONE_SIGHAND | CLONE_THREAD

# ioctl requests (asm-generic/ioctls.h); tests/test_jail_abi.py checks them against gcc
TCGETS = 0x5401
FIONBIO = 0x5421
FIONCLEX = 0x5450
FIOCLEX = 0x5451
FIONREAD = 0x541B
TIOCSTI = 0x5412


@dataclass(frozen=True)
class Group:
    why: str
    calls: tuple[str, ...]


GROUPS: tuple[Group, ...] = (
    Group("interpreter memory: malloc, arenas, thread stacks, the mmap of guest memory",
          ("brk", "mmap", "munmap", "mprotect", "madvise",
           "mremap")),                                    # mremap (review): realloc of big blocks
    Group("threads: the device worker and Python threading. clone only with thread flags (a "
          "fork is refused); clone3 answers ENOSYS so glibc falls back to clone, whose flags "
          "the filter can see",
          ("clone", "clone3", "set_robust_list", "rseq", "futex", "gettid", "exit",
           "rt_sigprocmask", "rt_sigaction",
           "rt_sigreturn", "sched_yield")),               # (review): signal return, lock backoff
    Group("process: exit, ids for log records and the server's root check, sleeping, abort()",
          ("exit_group", "getpid", "getuid", "geteuid", "getgid",
           "getegid", "restart_syscall", "tgkill",        # (review): tgkill for abort()/raise()
           "clock_nanosleep", "getrandom",                # (review): time.sleep, hash seeds
           "times")),                                     # (review): vhost-user CPU metrics
    Group("fd budget: the passthrough reads RLIMIT_NOFILE and raises the soft limit to the hard "
          "one (devices/virtio/fs/fdbudget.py); prlimit64 of this process only",
          ("prlimit64",)),
    Group("fd plumbing: eventfd counters, the report pipe, the back-end server's wake pipe "
          "(pipe2), fcntl(F_GETFL/F_SETFL/F_DUPFD_CLOEXEC); "
          "ioctl only TCGETS (isatty), FIONBIO (socket.setblocking), FIOCLEX/FIONCLEX "
          "(os.set_inheritable): no TIOCSTI into a terminal, no device ioctls",
          ("read", "write", "close", "fcntl", "lseek", "ioctl", "pipe2")),
    Group("waiting: the worker's epoll on kick/stop eventfds, interrupts through call eventfds, "
          "select/poll with timeouts",
          ("eventfd2", "epoll_create1", "epoll_ctl", "epoll_wait", "pselect6",
           "epoll_pwait", "poll", "ppoll")),              # (review): other waits of the stdlib
    Group("vhost-user socket: messages and SCM_RIGHTS fds on the socket the frontend gave us "
          "(no socket, connect, bind, accept: a jailed device opens no new channel)",
          ("recvmsg", "sendmsg", "recvfrom", "sendto", "getsockname", "getsockopt")),
    Group("passthrough, names: everything relative to an inode's O_PATH fd; chmod/openat reach "
          "an inode through its self/fd/N magic link",
          ("openat", "openat2", "newfstatat", "getdents64", "mkdirat", "mknodat", "symlinkat",
           "linkat", "unlinkat", "renameat2", "readlinkat", "fchownat", "utimensat", "chmod",
           "fchmodat")),                                  # (review): chmod relative to a dir fd
    Group("passthrough, file data and sync (the guest's READ/WRITE/FALLOCATE/COPY_FILE_RANGE/"
          "FSYNC/STATFS)",
          ("preadv2", "pwritev2", "pwrite64", "ftruncate", "truncate", "fallocate",
           "copy_file_range", "fsync", "fdatasync", "fstatfs",
           "pread64", "syncfs")),                         # (review): os.pread; SYNCFS (issue 11)
    Group("passthrough, xattrs: path calls through self/fd/N (O_PATH fds take no f*xattr); "
          "fgetxattr/fremovexattr find and drop a remapped file capability on WRITE "
          "(xattr_policy remap)",
          ("getxattr", "setxattr", "listxattr", "removexattr", "fgetxattr",
           "fremovexattr")),                              # (review): only when one exists
    Group("passthrough, creating as the guest caller (devices/virtio/fs/creds.py): each serving "
          "thread gets a private umask with unshare(CLONE_FS) (only that flag: no namespace) "
          "and sets the request's umask; the creation runs with the caller's fs uid/gid "
          "(setfsuid/setfsgid: file-system identity of this thread only, within the jail's "
          "CAP_SETUID/CAP_SETGID), and capget/capset raise again the effective capabilities the "
          "fs uid change dropped (capset cannot exceed the permitted set the jail left)",
          ("unshare", "umask", "setfsuid", "setfsgid", "capget", "capset")),
    Group("naming the device's threads for ps/top and the CPU benchmark (pyvmm-fs-TAG: "
          "bench/fuse_backends.py finds the worker by it); prctl only PR_SET_NAME",
          ("prctl",)),                                     # (review)
)

#: Argument checks and fixed answers (everything else in GROUPS is allowed outright).
RULES: dict[str, Rule] = {
    "clone": ArgMaskEq(0, THREAD_CLONE_FLAGS, THREAD_CLONE_FLAGS,
                       "threads only: CLONE_VM|CLONE_SIGHAND|CLONE_THREAD"),
    "clone3": Errno(errno.ENOSYS),
    "ioctl": ArgIn(1, (TCGETS, FIONBIO, FIOCLEX, FIONCLEX), "isatty, setblocking, cloexec"),
    "unshare": ArgIn(0, (CLONE_FS,), "a private umask/cwd for a thread: no namespace"),
    "prlimit64": ArgIn(0, (0,), "pid 0: this process's own limits"),
    "prctl": ArgIn(0, (PR_SET_NAME,), "PR_SET_NAME: a thread's own name, nothing else"),
}

#: Calls a jailed fs device must never be allowed (test_jail_policy keeps them out).
NEVER: dict[str, str] = {
    **dict.fromkeys(("execve", "execveat"), "running another program (a payload)"),
    **dict.fromkeys(("fork", "vfork"), "new processes (clone is limited to threads)"),
    **dict.fromkeys(("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4"),
                    "new network or Unix channels"),
    **dict.fromkeys(("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
                     "pidfd_open"), "reaching into other processes"),
    **dict.fromkeys(("mount", "umount2", "pivot_root", "chroot", "setns", "open_tree",
                     "move_mount", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr"),
                    "changing the jail's view of the file system or its namespaces (unshare is "
                    "allowed only with CLONE_FS, see RULES)"),
    **dict.fromkeys(("open_by_handle_at", "name_to_handle_at"),
                    "opening inodes by handle: the classic way out of a bind mount"),
    **dict.fromkeys(("kexec_load", "kexec_file_load", "init_module", "finit_module",
                     "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl",
                     "iopl", "ioperm", "syslog", "settimeofday", "clock_settime", "adjtimex",
                     "sethostname", "setdomainname"), "system administration"),
    **dict.fromkeys(("bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
                     "io_uring_enter", "io_uring_register", "keyctl", "add_key", "request_key",
                     "memfd_secret", "seccomp", "personality", "modify_ldt"),
                    "kernel attack surface the device does not need"),
    **dict.fromkeys(("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                     "setgroups"),
                    "changing credentials after the jail is set up (the per-thread fs uid/gid "
                    "of a creation and capset within the permitted set are allowed, see GROUPS; "
                    "prctl only as PR_SET_NAME, as in crosvm's common device policy, see RULES)"),
}


def _build() -> dict[str, Rule]:
    out: dict[str, Rule] = {}
    for g in GROUPS:
        for name in g.calls:
            if name in out:
                raise ValueError(f"{name} listed twice in the fs device policy")
            out[name] = RULES.get(name)
    missing = set(RULES) - set(out)
    if missing:
        raise ValueError(f"rules for calls not in any group: {sorted(missing)}")
    return out


#: name -> rule (None = allowed outright) for the fs device.
FS_DEVICE: dict[str, Rule] = _build()
