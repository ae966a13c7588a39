"""JSON-lines request trace: one object per request, flushed per line.

Each line is ``{"t": unix_time, "queue": i, "op": "LOOKUP", "unique": u, "nodeid": n,
"name": "x" | null, "error": 0 | errno, "us": microseconds}``.  Flushing every line costs a
syscall per request, which is acceptable because tracing is a debugging aid that is off by
default, and it means a trace survives a crashed or killed VMM up to the last request.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import IO

logger = logging.getLogger(__name__)


class Trace:
    """Thread-safe writer of trace records to a text stream (``Trace.open(path)`` for a file)."""

    def __init__(self, stream: IO[str], *, owns_stream: bool = False) -> None:
        self._stream = stream
        self._owns = owns_stream
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def open(cls, path: str) -> Trace:
        """Append to ``path`` (line-buffered UTF-8)."""
        return cls(open(path, "a", encoding="utf-8", buffering=1), owns_stream=True)

    def record(self, *, queue: int, op: str, unique: int, nodeid: int, name: bytes | None,
               error: int, us: float, t: float | None = None) -> None:
        line = json.dumps({
            "t": time.time() if t is None else t,
            "queue": queue,
            "op": op,
            "unique": unique,
            "nodeid": nodeid,
            "name": None if name is None else name.decode("utf-8", "backslashreplace"),
            "error": error,
            "us": round(us, 1),
        }, separators=(",", ":"))
        with self._lock:
            if self._failed:
                return
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError) as e:
                # A full disk or closed file must not take the request path down with it.
                self._failed = True
                logger.error("fuse trace disabled after write error: %s", e)

    def close(self) -> None:
        with self._lock:
            self._failed = True
            if self._owns:
                self._stream.close()
