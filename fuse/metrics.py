"""Request counters for a FUSE server, safe to update from several queue workers at once.

They exist to answer "what is the guest actually asking for?" -- e.g. how many LOOKUPs end in
ENOENT (the case a negative-entry timeout removes) and which names are probed most.
"""

from __future__ import annotations

import errno as errno_mod
import threading
from collections import Counter
from typing import Any

from .abi import init_flag_names

#: Default bound on distinct names kept in ``lookups_by_name`` (a guest can probe unboundedly
#: many names; beyond the cap new names are only counted in ``lookups_by_name_dropped``).
DEFAULT_MAX_NAMES = 10000


def errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, f"E{err}")


def _display_name(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def _by_display_name(counts: dict[bytes, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in counts.items():
        key = _display_name(name)
        out[key] = out.get(key, 0) + n
    return out


class Metrics:
    """Counters; ``snapshot()`` returns a JSON-able dict, ``reset()`` zeroes everything.

    * ``requests``: total requests handled (including dropped ones);
    * ``ops``: per opcode name (``"LOOKUP"``; ``"UNKNOWN"`` for opcodes we do not know);
    * ``errors``: error replies per errno name (``"ENOENT"``);
    * ``dropped``: requests that got no reply because they were malformed;
    * LOOKUP outcomes: ``lookup_positive``, ``lookup_negative`` (nodeid-0 reply),
      ``lookup_error`` (any errno reply, ENOENT included) and ``lookup_enoent`` (the ENOENT
      subset of ``lookup_error``);
    * ``lookups_by_name`` (capped at ``max_names`` names) and ``lookups_by_name_dropped``;
    * ``bytes_read`` (file data sent to the guest by READ) and ``bytes_written`` (file data
      taken from the guest by WRITE);
    * ``session``: what the latest INIT negotiated (``minor``, ``flags`` by name, ``max_write``),
      None before any; a reset keeps it.
    """

    # Updates run once or twice per request on the worker thread: they count raw values (errno
    # numbers, name bytes) and leave turning them into names to snapshot().

    def __init__(self, max_names: int = DEFAULT_MAX_NAMES) -> None:
        self._lock = threading.Lock()
        self.max_names = max_names
        self._session: dict[str, Any] | None = None  # state, not a counter: reset() keeps it
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._requests = 0
        self._dropped = 0
        self._ops: Counter[str] = Counter()
        self._errors: Counter[int] = Counter()
        self._lookup = Counter({"positive": 0, "negative": 0, "error": 0, "enoent": 0})
        self._names: dict[bytes, int] = {}
        self._names_dropped = 0
        self._bytes_read = 0
        self._bytes_written = 0

    def reset(self) -> None:
        with self._lock:
            self._reset_locked()

    def record_request(self, op: str, error: int) -> None:
        """One handled request; ``error`` is a positive errno, 0 for success."""
        with self._lock:
            self._requests += 1
            self._ops[op] += 1
            if error:
                self._errors[error] += 1

    def record_dropped(self, op: str | None = None) -> None:
        """A request that got no reply (malformed, or no room for one)."""
        with self._lock:
            self._requests += 1
            self._dropped += 1
            if op is not None:
                self._ops[op] += 1

    def record_lookup(self, name: bytes | None, nodeid: int | None, error: int) -> None:
        """Outcome of one LOOKUP: ``error`` (positive errno) or the replied ``nodeid``."""
        with self._lock:
            self._record_lookup_locked(name, nodeid, error)

    def record_lookup_request(self, name: bytes | None, nodeid: int | None,
                              error: int) -> None:
        """``record_request("LOOKUP", error)`` and ``record_lookup(...)`` under one lock
        acquisition: LOOKUP is the request a guest sends most."""
        with self._lock:
            self._requests += 1
            self._ops["LOOKUP"] += 1
            if error:
                self._errors[error] += 1
            self._record_lookup_locked(name, nodeid, error)

    def _record_lookup_locked(self, name: bytes | None, nodeid: int | None, error: int) -> None:
        if error:
            self._lookup["error"] += 1
            if error == errno_mod.ENOENT:
                self._lookup["enoent"] += 1
        elif nodeid == 0:
            self._lookup["negative"] += 1
        else:
            self._lookup["positive"] += 1
        if name is not None:
            key = bytes(name)
            if key in self._names:
                self._names[key] += 1
            elif len(self._names) < self.max_names:
                self._names[key] = 1
            else:
                self._names_dropped += 1

    def add_bytes_read(self, n: int) -> None:
        with self._lock:
            self._bytes_read += n

    def add_bytes_written(self, n: int) -> None:
        with self._lock:
            self._bytes_written += n

    def record_session(self, minor: int, flags: int, max_write: int) -> None:
        """What the latest INIT negotiated (7.<minor>, the enabled INIT flags, max_write)."""
        with self._lock:
            self._session = {"minor": minor, "flags": init_flag_names(flags),
                             "max_write": max_write}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "session": dict(self._session) if self._session else None,
                "requests": self._requests,
                "dropped": self._dropped,
                "ops": dict(self._ops),
                "errors": {errno_name(e): n for e, n in self._errors.items()},
                "lookup_positive": self._lookup["positive"],
                "lookup_negative": self._lookup["negative"],
                "lookup_error": self._lookup["error"],
                "lookup_enoent": self._lookup["enoent"],
                "lookups_by_name": _by_display_name(self._names),
                "lookups_by_name_dropped": self._names_dropped,
                "bytes_read": self._bytes_read,
                "bytes_written": self._bytes_written,
            }
