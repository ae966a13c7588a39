"""`Reader`/`Writer` over one request and one reply buffer of the host's /dev/fuse.

The kernel hands a whole request to one read(2) and takes a whole reply from one write(2), so the
transport owns two preallocated buffers per serving thread and the FUSE server reads and writes
them through the same :mod:`fuse.io` protocol it uses on virtqueues.  WRITE payloads go from the
request buffer to the file with ``os.pwrite`` on a view (no copy); READ data goes from the file into
the reply buffer with ``os.preadv`` on a view, then to the kernel with the reply's one write(2).
"""

from __future__ import annotations

import os

from fuse.io import BufferTooSmall


class RequestBuffer:
    """A :class:`fuse.io.Reader` over the first ``length`` bytes of a receive buffer.

    ``load(length)`` starts a new request; the buffer itself is reused for every request.
    """

    __slots__ = ("buf", "_view", "_pos", "_end")

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be > 0")
        self.buf = bytearray(capacity)
        self._view = memoryview(self.buf)
        self._pos = 0
        self._end = 0

    @property
    def capacity(self) -> int:
        return len(self.buf)

    def load(self, length: int) -> None:
        """The buffer now holds a request of ``length`` bytes (just read by the transport)."""
        if not 0 <= length <= len(self.buf):
            raise ValueError(f"request length {length} outside [0, {len(self.buf)}]")
        self._pos = 0
        self._end = length

    def remaining(self) -> int:
        return self._end - self._pos

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


class ReplyBuffer:
    """A :class:`fuse.io.Writer` into a preallocated reply buffer; ``reply()`` is what to send."""

    __slots__ = ("buf", "_view", "_pos", "_high")

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be > 0")
        self.buf = bytearray(capacity)
        self._view = memoryview(self.buf)
        self._pos = 0
        self._high = 0

    @property
    def capacity(self) -> int:
        return len(self.buf)

    def clear(self) -> None:
        """Start a new reply (the bytes are overwritten, not zeroed: nothing unwritten is sent)."""
        self._pos = 0
        self._high = 0

    def remaining(self) -> int:
        return len(self.buf) - self._pos

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos > self._high:
            self._high = self._pos

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n > self.remaining():
            raise BufferTooSmall(f"write {n} with {self.remaining()} left")
        self._view[self._pos:self._pos + n] = data
        self._advance(n)

    def write_from_fd(self, fd: int, size: int, offset: int) -> int:
        n = max(0, min(size, self.remaining()))
        if n == 0:
            return 0
        done = os.preadv(fd, [self._view[self._pos:self._pos + n]], offset)
        self._advance(done)
        return done

    def skip(self, n: int) -> None:
        if n < 0 or n > self.remaining():
            raise BufferTooSmall(f"skip {n} with {self.remaining()} left")
        self._advance(n)

    def write_at(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        if pos < 0 or pos + len(data) > self._pos:
            raise BufferTooSmall(f"write_at {pos}+{len(data)} beyond cursor {self._pos}")
        self._view[pos:pos + len(data)] = data

    @property
    def bytes_written(self) -> int:
        return self._high

    def reply(self, length: int) -> memoryview:
        """The first ``length`` bytes (what the server said it wrote), as a view to send."""
        if not 0 <= length <= self._high:
            raise ValueError(f"reply length {length} outside [0, {self._high}]")
        return self._view[:length]
