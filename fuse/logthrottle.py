"""Log lines a guest can cause, limited so that a hostile or broken guest cannot flood the host log.

Two kinds: malformed requests (every one is worth knowing about at first, then only a sample, with a
running count), and filesystem bugs (a traceback the first time for each op and exception type,
then one line).  The counts of what happened stay exact in the metrics; only the log is thinned.
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
