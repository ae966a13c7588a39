"""The process's file-descriptor budget for shared directories.

Every node id the guest knows and every handle it opens holds one host fd, so one passthrough can
hold up to ``max_inodes + max_handles`` fds. Linux starts a process at a soft RLIMIT_NOFILE of
1,024 (the hard limit is usually far higher), at which a guest used to exhaust the whole VMM:
LOOKUPs, OPENDIRs, FLUSHes and truncates all failed with EMFILE. So, once per process, the soft
limit is raised as far as needed (to the hard limit, or beyond it up to ``fs.nr_open`` where the
process may raise the hard limit, as virtiofsd does), and each new passthrough checks that the
limits of all live ones, plus :data:`HEADROOM` for the rest of the process, fit. When they do not,
one start-up WARNING says what is needed and how to get it; the limits are kept, and a request that
needs a new fd past the process limit then fails alone with EMFILE (requests needing no new fd,
LOOKUPs of known names and FLUSH included, keep working).
"""

from __future__ import annotations

import logging
import resource
import threading
import weakref
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: fds kept for everything but the tables: KVM, eventfds, sockets, the serial log, the trace,
#: and the transient fds of requests (CREATE's second open, SYNCFS, a FLUSH's duplicate).
HEADROOM = 256

_lock = threading.Lock()
_owners: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Budget:
    """What a check found: the soft limit after raising it, and the fds the live shares need."""

    limit: int
    needed: int

    @property
    def fits(self) -> bool:
        return self.needed <= self.limit


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, and both to ``needed`` (at most
    ``fs.nr_open``) when the hard limit is lower and the process may raise it
    (CAP_SYS_RESOURCE). Never lowers anything; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if hard != inf and hard < needed:
        want = min(needed, _nr_open())
        if want > hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
                return want
            except (ValueError, OSError):
                pass  # not allowed to raise the hard limit: go as far as it
    if soft != inf and (hard == inf or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return 1 << 62 if soft == inf else soft


def reserve(owner: object, fds: int, what: str) -> Budget:
    """Count ``fds`` for ``owner`` (until ``release(owner)`` or its garbage collection), raise
    the limit for all live owners plus HEADROOM, and log one WARNING when it cannot fit."""
    with _lock:
        _owners[owner] = fds
        needed = sum(_owners.values()) + HEADROOM
        limit = raise_nofile(needed)
    budget = Budget(limit, needed)
    if not budget.fits:
        logger.warning(
            "%s: the shared directories need up to %d fds (max_inodes + max_handles of each, plus"
            " %d for the VMM) but RLIMIT_NOFILE allows %d (hard limit): past it, requests needing"
            " a new fd fail with EMFILE. Raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower"
            " max_inodes/max_handles.", what, needed, HEADROOM, limit)
    return budget


def release(owner: object) -> None:
    """``owner`` holds no fds any more (its device was closed). Done explicitly rather than left
    to the garbage collector: a process that runs one VM after another (a test worker, a
    benchmark) would otherwise count the closed devices' tables against the next ones and warn
    of a shortfall that does not exist."""
    with _lock:
        _owners.pop(owner, None)
