"""Log lines a guest can cause, limited so that a hostile or broken guest cannot flood the host log.

Three kinds: malformed requests (every one is worth knowing about at first, then only a sample, with
a running count), filesystem bugs (a traceback the first time for each op and exception type, then
one line), and named events a guest can repeat at will, such as a failed device activation or a
broken ring (:meth:`LogThrottle.sample`: the 1st, 2nd, 4th, 8th... of each kind).  The counts of
what happened stay exact in the metrics; only the log is thinned.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

#: Malformed-request warnings logged in full before sampling starts.
FULL_WARNINGS = 50


class LogThrottle:
    """Thread-safe; one per server, logging to that server's logger."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._lock = threading.Lock()
        self._warnings = 0
        self._bugs: set[tuple[str, type]] = set()
        self._kinds: dict[str, int] = {}

    def warn(self, msg: str, *args: Any) -> None:
        """A malformed request: the first FULL_WARNINGS, then the 64th, 128th, 256th..."""
        with self._lock:
            self._warnings += 1
            n = self._warnings
        if n <= FULL_WARNINGS or (n & (n - 1)) == 0:
            if n > FULL_WARNINGS:
                msg += " (%d malformed so far)"
                args += (n,)
            self._logger.warning(msg, *args, stacklevel=2)

    def bug(self, op: str, exc: BaseException) -> None:
        """An unexpected exception from a filesystem, an encoder or the observer (``op``)."""
        key = (op, type(exc))
        with self._lock:
            first = key not in self._bugs
            self._bugs.add(key)
        if first:
            self._logger.error("%s: unexpected %s, replying EIO", op, type(exc).__name__,
                               exc_info=exc)
        else:
            self._logger.warning("%s: unexpected %s again (%s), replying EIO", op,
                                 type(exc).__name__, exc)

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
