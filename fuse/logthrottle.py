"""Log lines a guest can cause, limited so that a hostile or broken guest cannot flood the host log.

The one flood-limiting helper of the tree. Four kinds, one count each: guest-caused events
(malformed requests, INIT storms...: every one is worth knowing about at first, then only a
sample, with a running count), filesystem bugs (a traceback the first time for each op and
exception type, then a sampled one-liner), named events a guest can repeat at will, such as a
failed device activation or a broken ring (:meth:`LogThrottle.sample`: the 1st, 2nd, 4th, 8th...
of each kind), and problems worth one line per object (:meth:`LogThrottle.once`: a transport's
bad register accesses, a failed eventfd write).  The counts of what happened stay exact in the
metrics; only the log is thinned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from typing import Any

#: Distinct keys :meth:`LogThrottle.once` remembers (bounds its memory whatever the guest does).
ONCE_KEYS_MAX = 1024
#: Events of one kind logged in full before sampling starts.
FULL_WARNINGS = 50


def _sampled(n: int) -> bool:
    """The first FULL_WARNINGS occurrences, then the 64th, 128th, 256th..."""
    return n <= FULL_WARNINGS or (n & (n - 1)) == 0


class LogThrottle:
    """Thread-safe; one per server (or module), logging to that logger."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._lock = threading.Lock()
        self._warnings = 0
        self._bugs: dict[tuple[str, type], int] = {}
        self._kinds: dict[str, int] = {}
        self._once: set[Hashable] = set()
        self._once_full = False

    def warn(self, msg: str, *args: Any) -> None:
        """A malformed request or another guest-caused event worth a warning (sampled)."""
        self.log(logging.WARNING, msg, *args, stacklevel=3)

    def log(self, level: int, msg: str, *args: Any, stacklevel: int = 2) -> None:
        """A guest-caused event at ``level``; every level shares one count (sampled)."""
        with self._lock:
            self._warnings += 1
            n = self._warnings
        if _sampled(n):
            if n > FULL_WARNINGS:
                msg += " (%d guest-caused events logged so far)"
                args += (n,)
            self._logger.log(level, msg, *args, stacklevel=stacklevel)

    def bug(self, op: str, exc: BaseException, outcome: str = "replying EIO") -> None:
        """An unexpected exception from a filesystem, an encoder or the observer (``op``);
        ``outcome`` says what the caller does about it."""
        key = (op, type(exc))
        with self._lock:
            n = self._bugs.get(key, 0) + 1
            self._bugs[key] = n
        if n == 1:
            self._logger.error("%s: unexpected %s, %s", op, type(exc).__name__, outcome,
                               exc_info=exc)
        elif _sampled(n):
            self._logger.warning("%s: unexpected %s again (%s; %d times), %s", op,
                                 type(exc).__name__, exc, n, outcome)

    def sample(self, kind: str, level: int, msg: str, *args: Any) -> None:
        """An event of ``kind`` (a fixed string chosen by the caller, never guest data): the
        1st, 2nd, 4th, 8th... occurrence is logged at ``level``, with the running count."""
        with self._lock:
            n = self._kinds.get(kind, 0) + 1
            self._kinds[kind] = n
        if n & (n - 1) == 0:
            if n > 1:
                msg += " (%d times so far; logging every power of two)"
                args += (n,)
            self._logger.log(level, msg, *args, stacklevel=2)

    def once(self, key: Hashable, level: int, msg: str, *args: Any) -> bool:
        """Log the first event of ``key`` at ``level`` and drop later ones; True if this call
        logged. ``key`` is chosen by the caller from a small set (a fixed string, an errno, an
        exception type); where it comes from guest data (an address on a bus) the set is capped at
        ONCE_KEYS_MAX, after which one line says so and nothing more is logged or remembered."""
        with self._lock:
            if key in self._once:
                return False
            full = len(self._once) >= ONCE_KEYS_MAX
            if full:
                first_overflow, self._once_full = not self._once_full, True
            else:
                self._once.add(key)
        if full:
            if first_overflow:
                self._logger.warning("%d distinct events logged once; not logging further new ones",
                                     ONCE_KEYS_MAX, stacklevel=2)
            return False
        self._logger.log(level, msg, *args, stacklevel=2)
        return True
