"""The transport protocol the FUSE server consumes, plus in-memory implementations.

The server never sees virtqueues or guest memory: it reads a request through a :class:`Reader`
and writes the reply through a :class:`Writer`.  The virtio layer implements both over the
readable/writable halves of a descriptor chain (with ``preadv``/``pwritev`` straight into guest
memory for file data); :class:`BytesReader`/:class:`BytesWriter` implement them over plain
buffers so the server can be tested and fuzzed without a VM, including the zero-copy paths
(they really call ``os.pwrite``/``os.preadv``).  :class:`LimitedReader` bounds another reader
to the length the request header declares.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


class BufferTooSmall(Exception):
    """The chain holds fewer bytes than a read asked for, or less room than a write needs."""


@runtime_checkable
class Reader(Protocol):
    def remaining(self) -> int:
        """Bytes not yet consumed."""
        ...

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or BufferTooSmall (and nothing is consumed)."""
        ...

    def read_to_fd(self, fd: int, size: int, offset: int) -> int:
        """Move up to ``size`` request bytes into ``fd`` at ``offset``; returns bytes moved."""
        ...


@runtime_checkable
class Writer(Protocol):
    def remaining(self) -> int:
        """Room left after the cursor."""
        ...

    def write(self, data: bytes | memoryview) -> None:
        """Write all of ``data`` at the cursor, or BufferTooSmall (and nothing is written)."""
        ...

    def write_from_fd(self, fd: int, size: int, offset: int) -> int:
        """Move up to ``size`` bytes of ``fd`` at ``offset`` into the reply; returns bytes moved."""
        ...

    def skip(self, n: int) -> None:
        """Advance the cursor by ``n`` (reserve room for a header written later)."""
        ...

    def write_at(self, pos: int, data: bytes) -> None:
        """Write ``data`` at absolute position ``pos``; the range must lie below the cursor."""
        ...

    @property
    def bytes_written(self) -> int:
        """Highest position written (or skipped over), i.e. the reply length so far."""
        ...


class BytesReader:
    """A :class:`Reader` over an in-memory request."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(bytes(data))
        self._pos = 0

    def remaining(self) -> int:
        return len(self._view) - self._pos

    def read(self, size: int) -> bytes:
        if size < 0 or size > self.remaining():
            raise BufferTooSmall(f"read {size} with {self.remaining()} left")
        out = bytes(self._view[self._pos:self._pos + size])
        self._pos += size
        return out

    def read_to_fd(self, fd: int, size: int, offset: int) -> int:
        n = max(0, min(size, self.remaining()))
        if n == 0:
            return 0
        done = os.pwrite(fd, self._view[self._pos:self._pos + n], offset)
        self._pos += done
        return done


class BytesWriter:
    """A :class:`Writer` into a fixed-capacity bytearray; ``data`` is the reply written so far."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._buf = bytearray(capacity)
        self._pos = 0
        self._high = 0

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos > self._high:
            self._high = self._pos

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n > self.remaining():
            raise BufferTooSmall(f"write {n} with {self.remaining()} left")
        self._buf[self._pos:self._pos + n] = data
        self._advance(n)

    def write_from_fd(self, fd: int, size: int, offset: int) -> int:
        n = max(0, min(size, self.remaining()))
        if n == 0:
            return 0
        view = memoryview(self._buf)[self._pos:self._pos + n]
        try:
            done = os.preadv(fd, [view], offset)
        finally:
            view.release()
        self._advance(done)
        return done

    def skip(self, n: int) -> None:
        if n < 0 or n > self.remaining():
            raise BufferTooSmall(f"skip {n} with {self.remaining()} left")
        self._advance(n)

    def write_at(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        if pos < 0 or pos + len(data) > self._pos:
            raise BufferTooSmall(f"write_at {pos}+{len(data)} beyond cursor {self._pos}")
        self._buf[pos:pos + len(data)] = data

    @property
    def bytes_written(self) -> int:
        return self._high

    @property
    def data(self) -> bytes:
        """The reply bytes, ``[0, bytes_written)``."""
        return bytes(self._buf[:self._high])


class LimitedReader:
    """A Reader that exposes only the first ``limit`` bytes of another one.

    The server wraps the transport's reader in one when ``in_header.len`` says the request is
    shorter than the readable buffer, so that trailing bytes (or 7.38 request extensions) are
    never taken as arguments or file data.
    """

    __slots__ = ("_inner", "_left")

    def __init__(self, inner: Reader, limit: int) -> None:
        self._inner = inner
        self._left = limit

    def remaining(self) -> int:
        return self._left

    def read(self, size: int) -> bytes:
        if size < 0 or size > self._left:
            raise BufferTooSmall(f"read {size} with {self._left} left")
        data = self._inner.read(size)
        self._left -= size
        return data

    def read_to_fd(self, fd: int, size: int, offset: int) -> int:
        n = self._inner.read_to_fd(fd, max(0, min(size, self._left)), offset)
        self._left -= n
        return n
