"""Entering a jail: ``enter`` jails the calling process, ``spawn_jailed`` a new child.

Order (each step needs what the later ones take away):

1. ``unshare`` the namespaces, then fork: the child is PID 1 of the new PID namespace and is the
   jailed process; the caller stays outside as a *relay* that waits for it and exits with its
   status (a death by signal is re-raised), so whoever started the jail sees the device's own
   exit status on the relay's pid.
   With ``uid_map``/``gid_map`` the unshare also makes a user namespace, which owns the others;
   its maps are written from outside by a helper forked just before (userns.py).
2. Mounts (still holding CAP_SYS_ADMIN): propagation made slave, a private procfs kept as an fd,
   the share bind-mounted nosuid/nodev/noexec, pivot_root (or chroot) into it.
   In a user namespace the process then becomes its uid/gid 0 with no supplementary groups
   (userns.become): from here on it holds only the mapped host ids.
3. Every fd not asked for is closed (a directory fd would lead out of the new root).
4. rlimits (RLIMIT_NOFILE as configured, no core dumps) and not dumpable: guest memory is mapped
   into this process and must never land in a core file on the host.
5. Capabilities dropped (needs CAP_SETPCAP, so before the rest).
6. no_new_privs.
7. seccomp, last: from here on only allowlisted calls run.

After ``enter`` the process's cwd is the private procfs (namespace and chroot modes), so the
relative path ``self/fd/N`` reopens fd N exactly as ``/proc/self/fd/N`` does outside a jail; the
passthrough uses that through ``devices.virtio.fs.inodes.set_proc_root("")``. Nothing else in
the device uses relative paths. Modules are not importable after pivot_root (the interpreter's
files are outside the new root): import everything the jailed code needs before ``enter``.

Forking: ``spawn_jailed`` forks the calling process. Do it from the main thread (the relay's
parent-death signal is tied to the thread that forked) and before starting threads that hold
locks the child will need.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import resource
import select
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from . import _sys, capabilities, namespaces, seccomp, userns
from .spec import JailError, JailSpec

logger = logging.getLogger(__name__)

#: Exit status of a jailed child whose jail could not be set up (as util-linux unshare uses).
EXIT_SETUP_FAILED = 125
_READY = b"ready\n"
_SETUP_TIMEOUT_S = 30.0


@dataclass
class Jail:
    """What the jailed process has after ``enter``."""

    spec: JailSpec
    #: O_PATH fd of the private procfs root (namespace/chroot modes), else None.
    proc_fd: int | None
    #: Capability mask kept (None: untouched).
    caps: int | None

    @property
    def proc_root(self) -> str:
        """Prefix under which ``self/fd/N`` names this process's fds: "" (relative to the cwd,
        which ``enter`` left on the private procfs) in a jail, "/proc/" otherwise."""
        return "" if self.proc_fd is not None else "/proc/"


# ------------------------------------------------------------------------------ entering


def enter(spec: JailSpec, *, report_fd: int | None = None) -> Jail:
    """Jail the calling process as `spec` says and return in the jailed process.

    In namespace/chroot modes the calling process forks; the caller's process becomes the relay
    (it never returns from here) and the new child, PID 1 of the new namespace, returns. The relay
    writes ``pid N`` (the jailed process's pid in the caller's namespace) to `report_fd`."""
    if spec.mode == "none":
        return _lock_down(spec, None, report_fd)
    root = spec.real_root()
    if spec.userns:
        _enter_userns(spec)
    else:
        namespaces.unshare(namespaces.JAIL_NAMESPACES)
    pid = os.fork()
    if pid:
        _relay(pid, report_fd)                       # never returns
    try:
        _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)  # the relay dies -> so do we
        namespaces.make_mounts_slave()
        proc_fd = namespaces.open_private_proc()
        namespaces.bind_root(root)
        if spec.mode == "namespace":
            namespaces.pivot_into(root)
        else:
            namespaces.chroot_into(root)
        namespaces.set_hostname(spec.hostname)
        if spec.userns:
            userns.become(0, 0)
        return _lock_down(spec, proc_fd, report_fd)
    except BaseException:
        _report_error(report_fd)
        os._exit(EXIT_SETUP_FAILED)


def _enter_userns(spec: JailSpec) -> None:
    """unshare with a new user namespace (owning the other new namespaces, so the mounts and
    pivot_root below are allowed in it) and have its maps written from outside (userns.py)."""
    if spec.max_open_files is not None:
        # Raising the hard limit needs CAP_SYS_RESOURCE of the initial namespace: now or never.
        _set_nofile(spec.max_open_files)
    writer = userns.MapWriter(*spec.maps())
    try:
        namespaces.unshare(namespaces.JAIL_NAMESPACES | namespaces.CLONE_NEWUSER)
    except OSError as exc:
        writer.abandon()
        # unshare changes all or nothing: the caller may retry without a user namespace
        raise userns.UserNamespaceUnavailable(f"no user namespace here: {exc}") from None
    except BaseException:
        writer.abandon()
        raise
    writer.write()


def _lock_down(spec: JailSpec, proc_fd: int | None, report_fd: int | None) -> Jail:
    """Steps 3-7 of the module docstring."""
    keep = {0, 1, 2, *spec.keep_fds}
    if proc_fd is not None:
        keep.add(proc_fd)
    if report_fd is not None:
        keep.add(report_fd)
    if spec.mode != "none":
        _close_fds_except(keep)
        for fd in sorted(set(spec.keep_fds) | {0, 1, 2}):
            _refuse_directory_fd(fd)
    if spec.max_open_files is not None:
        _set_nofile(spec.max_open_files)
    if spec.mode != "none":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _sys.prctl(_sys.PR_SET_DUMPABLE, 0)
    if proc_fd is not None:
        os.fchdir(proc_fd)
    kept = None
    want = spec.caps_mask()
    if want is not None:
        # capset and no_new_privs act on the calling thread only: another thread would keep
        # everything (seccomp's TSYNC covers threads, capabilities do not).
        threads = os.listdir("self/task" if proc_fd is not None else "/proc/self/task")
        if len(threads) != 1:
            raise JailError(f"{len(threads)} threads: jail a process before it starts threads")
        kept = capabilities.drop_to(want)
        if kept != want:
            logger.warning("jail: capabilities %s were not available to keep",
                           ", ".join(capabilities.names_of(want & ~kept)))
    if spec.no_new_privs:
        _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    if spec.seccomp_action is not None:
        rules = seccomp.rules_by_number(spec.allowlist())
        seccomp.install(seccomp.compile_filter(rules, seccomp.ACTIONS[spec.seccomp_action]))
    return Jail(spec, proc_fd, kept)


def _close_fds_except(keep: set[int]) -> None:
    if faulthandler.is_enabled():
        # Its private dup of stderr would be closed under it; a crash report must go to fd 2,
        # never into whatever file later reuses that fd number.
        faulthandler.enable(file=2, all_threads=True)
    lo = 0
    for fd in sorted(keep):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)


def _refuse_directory_fd(fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError:
        return                                       # not open: nothing to leak
    if stat.S_ISDIR(st.st_mode):
        raise JailError(f"fd {fd} is a directory: it would lead out of the jail")


def _set_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (OSError, ValueError):
        # Raising the hard limit needs CAP_SYS_RESOURCE; stay within the current one.
        m = min(n, hard)
        logger.warning("jail: RLIMIT_NOFILE %d not possible, using %d", n, m)
        resource.setrlimit(resource.RLIMIT_NOFILE, (m, m))


# ------------------------------------------------------------------------------ the relay


def _relay(pid: int, report_fd: int | None) -> None:
    """The caller's side after the PID-namespace fork: report the pid, wait, mirror the exit."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # PID 1 of a namespace ignores signals it has no handler for; stopping the relay
            # must stop the device.
            signal.signal(sig, lambda *_a: _kill_quietly(pid))
        if report_fd is not None:
            _write_all(report_fd, f"pid {pid}\n".encode())
        os.closerange(3, 1 << 20)                    # our copies of the device's fds included
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                os._exit(1)
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if signum not in (signal.SIGKILL, signal.SIGSTOP):   # these have no handler to reset
                signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
            os.kill(os.getpid(), signum)
            code = 128 + signum
        else:
            code = os.waitstatus_to_exitcode(status)
    finally:
        os._exit(code)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _report_error(report_fd: int | None) -> None:
    text = traceback.format_exc()
    try:
        os.write(2, f"pyvmm jail: setup failed:\n{text}".encode())
    except OSError:
        pass
    if report_fd is not None:
        last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
        try:
            _write_all(report_fd, f"error {last}\n".encode())
        except OSError:
            pass


# ------------------------------------------------------------------------------ spawning


class JailedChild:
    """Handle on a child started by ``spawn_jailed``.

    ``pid`` is the process to wait for (the relay in namespace/chroot modes; it exits with the
    jailed process's status), ``jailed_pid`` the jailed process itself as seen from here.
    ``fileno()`` is a pidfd that becomes readable when the child has exited (for epoll)."""

    def __init__(self, pid: int, jailed_pid: int) -> None:
        self.pid = pid
        self.jailed_pid = jailed_pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)

    def fileno(self) -> int:
        if self._pidfd is None:
            raise ValueError("child already reaped")
        return self._pidfd

    def poll(self) -> int | None:
        """Exit code (negative: killed by that signal) or None while running."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to `timeout` seconds (None: forever); returns poll()."""
        if self.returncode is None and self._pidfd is not None:
            r, _, _ = select.select([self._pidfd], [], [], timeout)
            if r:
                _, status = os.waitpid(self.pid, 0)
                self._reaped(status)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the relay; the jailed process follows (parent-death signal)."""
        if self.returncode is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.returncode is None:
            self.kill()
            self.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _reaped(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __enter__(self) -> JailedChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn_jailed(target: Callable[[Jail], int | None], spec: JailSpec) -> JailedChild:
    """Fork a child, jail it as `spec` says, and run ``target(jail)`` in it.

    Returns once the jail is in place (the target may already be running); the child exits with
    target's return value (None -> 0; an exception -> 1, traceback on fd 2). A jail that cannot
    be set up raises JailError here with the child's reason."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _child(target, spec, r, w)                   # never returns
    os.close(w)
    try:
        messages = _read_reports(r, pid)
    finally:
        os.close(r)
    jailed_pid = pid
    for line in messages:
        if line.startswith("pid "):
            jailed_pid = int(line[4:])
    child = JailedChild(pid, jailed_pid)
    if _READY.decode().strip() not in messages:
        child.kill()
        code = child.wait()
        errors = [m[6:] for m in messages if m.startswith("error ")]
        raise JailError(f"jail setup failed (exit status {code}): "
                        f"{errors[0] if errors else 'no reason given'}")
    return child


def _child(target: Callable[[Jail], int | None], spec: JailSpec, r: int, w: int) -> None:
    code = 1
    try:
        os.close(r)
        parent = os.getppid()
        _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:                   # it died before the line above
            os._exit(1)
        try:
            jail = enter(spec, report_fd=w)
        except BaseException:
            _report_error(w)
            os._exit(EXIT_SETUP_FAILED)
        _write_all(w, _READY)
        os.close(w)
        try:
            result = target(jail)
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            try:
                os.write(2, traceback.format_exc().encode())
            except OSError:
                pass
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
    finally:
        os._exit(code)


def _read_reports(r: int, pid: int) -> list[str]:
    """Lines from the jail's report pipe until every writer (the relay after ``pid N``, the
    jailed process after ``ready``) has closed it; bounded, so a wedged setup cannot hang us."""
    buf = b""
    deadline = time.monotonic() + _SETUP_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            _kill_quietly(pid)
            buf += b"\nerror jail setup timed out\n"
            break
        chunk = os.read(r, 4096)
        if not chunk:
            break
        buf += chunk
    return [ln for ln in buf.decode(errors="replace").splitlines() if ln]
