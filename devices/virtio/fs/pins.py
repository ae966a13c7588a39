"""Pinned fds: the one rule for closing an fd that a concurrent request may still be using.

The inode table (inodes.py) and the handle table (handles.py) both map guest-chosen numbers to host
fds, and both face the same race: the guest may FORGET a node or RELEASE a handle on one queue while
a request on another queue is still using its fd. Closing at that moment would let the fd number be
reused by an unrelated open, and the in-flight request would act on the wrong file. So a request
*pins* the entry for its duration, removal only marks it dead, and the fd is closed by whoever drops
the last pin of a dead entry.

The table lock guards only dictionary updates and pin counts, never a system call. Two failure modes
are still made impossible here rather than trusted away, because a wedged table lock silently stops
every later request of the device:

* CPython reports an error that an earlier C call left pending (e.g. ``os.lseek`` returning a
  negative offset on tmpfs in 3.11) at the return of some *later* C call. If that call is the
  lock's acquire, the lock was taken but the ``with`` statement never starts, so it would stay
  held forever. :class:`TableLock` checks whether this thread owns the lock after any exception
  from acquire and releases it again.
* A lock held longer than :data:`LOCK_TIMEOUT` seconds can only be a bug: waiters fail with
  ``EDEADLK`` (the guest gets an error reply) instead of blocking the worker forever.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)

#: Longest wait for a table lock. Critical sections are a few dictionary operations long.
LOCK_TIMEOUT = 5.0


class TableLock:
    """A mutex whose acquisition can neither leak nor wait forever (see the module docstring)."""

    __slots__ = ("_lock", "_what")

    def __init__(self, what: str) -> None:
        # An RLock only because it can tell whether *this* thread holds it (``_is_owned``, the
        # same private method threading.Condition relies on); nothing re-enters a table lock.
        self._lock = threading.RLock()
        self._what = what

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock within ``timeout`` seconds (default LOCK_TIMEOUT); False if it could
        not be taken."""
        try:
            return self._lock.acquire(timeout=LOCK_TIMEOUT if timeout is None else timeout)
        except BaseException:
            # The acquire may have succeeded before a stale error surfaced at its return.
            if self._lock._is_owned():  # type: ignore[attr-defined]
                self._lock.release()
            raise

    def held(self) -> bool:
        """Whether any thread holds the lock (for tests and diagnostics)."""
        if not self._lock.acquire(blocking=False):
            return True
        self._lock.release()
        return self._lock._is_owned()  # type: ignore[attr-defined]

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        # acquire() written out: every request takes this lock twice per pin.
        lock = self._lock
        try:
            taken = lock.acquire(True, LOCK_TIMEOUT)
        except BaseException:
            if lock._is_owned():  # type: ignore[attr-defined]
                lock.release()
            raise
        if not taken:
            logger.error("%s lock held for more than %.0f s: refusing the request", self._what,
                         LOCK_TIMEOUT)
            raise OSError(errno.EDEADLK, f"{self._what} is wedged")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Pinnable(Protocol):
    """What an entry of a pinned table carries: its fd (-1 once closed), pins, and liveness."""

    fd: int
    pins: int
    live: bool


E = TypeVar("E", bound=Pinnable)


class PinnedFds:
    """Pin/unpin/retire for the entries of one table, all under that table's :class:`TableLock`."""

    def __init__(self, what: str) -> None:
        self.lock = TableLock(what)

    def pin(self, find: Callable[..., E], *key: object) -> _Pin[E]:
        """Borrow the entry ``find(*key)`` returns (``find`` runs under the lock and raises if
        the entry is unknown); its fd stays open until the ``with`` block ends."""
        return _Pin(self, find, key)

    def retire(self, entry: Pinnable) -> int:
        """Mark ``entry`` dead (caller holds the lock); returns the fd to close now, or -1 when a
        request still holds a pin (the last unpin closes it)."""
        entry.live = False
        return self._take_fd_if_dead(entry)

    @staticmethod
    def _take_fd_if_dead(entry: Pinnable) -> int:
        if entry.live or entry.pins or entry.fd < 0:
            return -1
        fd, entry.fd = entry.fd, -1
        return fd

    def clear(self, entries: Callable[[], Sequence[Pinnable]]) -> bool:
        """Retire every entry ``entries()`` hands over (it runs under the lock and empties the
        table). False if the lock is wedged: the caller then abandons the table (its fds leak)."""
        if not self.lock.acquire():
            logger.error("%s lock wedged: abandoning the table and its fds", self.lock._what)
            return False
        try:
            fds = [self.retire(e) for e in entries()]
        finally:
            self.lock.release()
        for fd in fds:
            close_fd(fd)
        return True


class _Pin(Generic[E]):
    """The ``with`` block of :meth:`PinnedFds.pin`.

    A class, not a ``@contextmanager`` generator: every request takes one or two pins, and a
    generator (built, advanced, and on an error reply -- a missing name -- thrown into) costs
    several times the Python calls of ``__enter__``/``__exit__``, which counts on a worker that
    runs cold (issue 9).
    """

    __slots__ = ("_pins", "_find", "_key", "_entry")

    def __init__(self, pins: PinnedFds, find: Callable[..., E], key: tuple[object, ...]) -> None:
        self._pins = pins
        self._find = find
        self._key = key

    def __enter__(self) -> E:
        with self._pins.lock:
            entry = self._find(*self._key)
            entry.pins += 1
        self._entry = entry
        return entry

    def __exit__(self, *exc: object) -> None:
        entry = self._entry
        with self._pins.lock:
            entry.pins -= 1
            fd = PinnedFds._take_fd_if_dead(entry)
        close_fd(fd)


def close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)
