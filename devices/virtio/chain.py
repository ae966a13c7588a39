"""`Reader`/`Writer` over a descriptor chain: the fuse.io transport protocol on guest memory.

The FUSE server reads a request and writes its reply through these without knowing about virtqueues.
Every buffer is a view straight into guest memory, and file data moves with `os.pwritev`/`os.preadv`
on those views, so a READ or WRITE payload is never copied through a Python bytes object.
"""

from __future__ import annotations

import bisect
import os

from devices.virtio.queue import DescriptorChain
from fuse.io import BufferTooSmall

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    IOV_MAX = 1024
if IOV_MAX <= 0:
    IOV_MAX = 1024


class _Segments:
    """A list of guest-memory views addressed as one contiguous byte range [0, total)."""

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self.starts: list[int] = []
        total = 0
        for v in views:
            self.starts.append(total)
            total += len(v)
        self.total = total

    def slices(self, pos: int, size: int) -> list[memoryview]:
        """Views covering [pos, pos + size) (the caller has checked the range)."""
        out: list[memoryview] = []
        if size <= 0:
            return out
        i = bisect.bisect_right(self.starts, pos) - 1
        off = pos - self.starts[i]
        while size > 0:
            v = self.views[i]
            n = min(len(v) - off, size)
            out.append(v[off:off + n])
            size -= n
            i += 1
            off = 0
        return out


def _chunks(bufs: list[memoryview]):
    for i in range(0, len(bufs), IOV_MAX):
        yield bufs[i:i + IOV_MAX]


class ChainReader:
    """The device-readable half of a chain (the FUSE request), consumed front to back."""

    def __init__(self, chain: DescriptorChain) -> None:
        self._seg = _Segments(chain.readable)
        self._pos = 0

    def remaining(self) -> int:
        return self._seg.total - self._pos

    def read(self, size: int) -> bytes:
        if size < 0 or size > self.remaining():
            raise BufferTooSmall(f"read {size} with {self.remaining()} left")
        data = b"".join(self._seg.slices(self._pos, size))
        self._pos += size
        return data

    def read_to_fd(self, fd: int, size: int, offset: int) -> int:
        """pwritev the next `size` request bytes into `fd` at `offset`; returns bytes moved."""
        size = max(0, min(size, self.remaining()))
        done = 0
        for bufs in _chunks(self._seg.slices(self._pos, size)):
            want = sum(len(b) for b in bufs)
            try:
                n = os.pwritev(fd, bufs, offset + done)
            except OSError:
                if done:
                    break  # report the part that did reach the file
                raise
            done += n
            if n < want:
                break
        self._pos += done
        return done


class ChainWriter:
    """The device-writable half of a chain (the FUSE reply)."""

    def __init__(self, chain: DescriptorChain) -> None:
        self._seg = _Segments(chain.writable)
        self._pos = 0
        self._high = 0

    def remaining(self) -> int:
        return self._seg.total - self._pos

    def _advance(self, n: int) -> None:
        self._pos += n
        self._high = max(self._high, self._pos)

    def _copy_in(self, pos: int, data: bytes | memoryview) -> None:
        src = memoryview(data).cast("B")
        done = 0
        for dst in self._seg.slices(pos, len(src)):
            dst[:] = src[done:done + len(dst)]
            done += len(dst)

    def write(self, data: bytes | memoryview) -> None:
        n = len(memoryview(data).cast("B"))
        if n > self.remaining():
            raise BufferTooSmall(f"write {n} with {self.remaining()} left")
        self._copy_in(self._pos, data)
        self._advance(n)

    def write_from_fd(self, fd: int, size: int, offset: int) -> int:
        """preadv up to `size` bytes of `fd` at `offset` into the reply; returns bytes moved."""
        size = max(0, min(size, self.remaining()))
        done = 0
        for bufs in _chunks(self._seg.slices(self._pos, size)):
            want = sum(len(b) for b in bufs)
            try:
                n = os.preadv(fd, bufs, offset + done)
            except OSError:
                if done:
                    break
                raise
            done += n
            if n < want:  # end of file
                break
        self._advance(done)
        return done

    def skip(self, n: int) -> None:
        if n < 0 or n > self.remaining():
            raise BufferTooSmall(f"skip {n} with {self.remaining()} left")
        self._advance(n)

    def write_at(self, pos: int, data: bytes | memoryview) -> None:
        n = len(memoryview(data).cast("B"))
        if pos < 0 or pos + n > self._pos:
            raise BufferTooSmall(f"write_at {pos}+{n} beyond cursor {self._pos}")
        self._copy_in(pos, data)

    @property
    def bytes_written(self) -> int:
        return self._high
