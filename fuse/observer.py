"""How the server reports what happened to each request: one injected observer.

The server calls its observer once per request, after the reply is written, with everything known
about the outcome; handlers never see it.  With no observer installed the server does not even read
the clock.  :class:`Recorder` is the observer the virtio-fs device installs: it feeds
:class:`~fuse.metrics.Metrics` and, when tracing, the :class:`~fuse.trace.Trace`.
"""

from __future__ import annotations

from typing import Any, Protocol

from .abi import INIT_OUT, Opcode
from .filesystem import Entry
from .metrics import Metrics
from .trace import Trace

_OP_NAMES = {int(op): op.name for op in Opcode}
_LOOKUP, _READ, _WRITE = int(Opcode.LOOKUP), int(Opcode.READ), int(Opcode.WRITE)
_INIT = int(Opcode.INIT)


class RequestObserver(Protocol):
    """Told the outcome of every request; ``opcode``, ``unique`` and ``nodeid`` are the
    request header's, ``name`` the first name the request carried (None if it had none)."""

    def handled(self, queue: int, opcode: int, unique: int, nodeid: int, name: bytes | None,
                error: int, result: Any, elapsed_ns: int) -> None:
        """A request was answered (or, for FORGET-like opcodes, carried out).

        ``error`` is the positive errno replied (0: success); ``result`` what the filesystem
        returned on success: the :class:`Entry` of a LOOKUP, the byte count of a READ or
        WRITE (None when ``error`` is set).
        """
        ...

    def dropped(self, queue: int, opcode: int | None, unique: int, nodeid: int,
                name: bytes | None, elapsed_ns: int) -> None:
        """A request got no reply: malformed beyond answering (``opcode`` None when not even
        the header was readable), no room for a reply, or a failed no-reply opcode."""
        ...


def op_name(opcode: int) -> str:
    """The opcode's UAPI name without ``FUSE_``; ``"UNKNOWN"`` outside the ABI."""
    return _OP_NAMES.get(opcode, "UNKNOWN")


class Recorder:
    """A :class:`RequestObserver` that counts into ``metrics`` and traces into ``trace``."""

    __slots__ = ("metrics", "trace")

    def __init__(self, metrics: Metrics | None = None, trace: Trace | None = None) -> None:
        self.metrics = metrics
        self.trace = trace

    def handled(self, queue: int, opcode: int, unique: int, nodeid: int, name: bytes | None,
                error: int, result: Any, elapsed_ns: int) -> None:
        op = _OP_NAMES.get(opcode, "UNKNOWN")
        metrics = self.metrics
        if metrics is not None:
            if opcode == _LOOKUP:
                reply_nodeid = result.nodeid if isinstance(result, Entry) else None
                metrics.record_lookup_request(name, reply_nodeid, error)
            else:
                metrics.record_request(op, error)
                if not error:
                    if opcode == _READ:
                        metrics.add_bytes_read(result)
                    elif opcode == _WRITE:
                        metrics.add_bytes_written(result)
                    elif opcode == _INIT and len(result) >= INIT_OUT.size:
                        out = INIT_OUT.unpack(result)  # once per session: what was negotiated
                        metrics.record_session(out.minor, out.flags | out.flags2 << 32,
                                               out.max_write)
        if self.trace is not None:
            self._trace(queue, opcode, op, unique, nodeid, name, error, elapsed_ns)

    def dropped(self, queue: int, opcode: int | None, unique: int, nodeid: int,
                name: bytes | None, elapsed_ns: int) -> None:
        if opcode is None:
            if self.metrics is not None:
                self.metrics.record_dropped()
            return
        op = _OP_NAMES.get(opcode, "UNKNOWN")
        if self.metrics is not None:
            self.metrics.record_dropped(op)
        if self.trace is not None:
            self._trace(queue, opcode, op, unique, nodeid, name, 0, elapsed_ns)

    def _trace(self, queue: int, opcode: int, op: str, unique: int, nodeid: int,
               name: bytes | None, error: int, elapsed_ns: int) -> None:
        assert self.trace is not None
        self.trace.record(queue=queue, op=op if op != "UNKNOWN" else f"OP_{opcode}",
                          unique=unique, nodeid=nodeid, name=name, error=error,
                          us=elapsed_ns / 1000.0)
