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
    """A list of guest-memory views addressed as one contiguous byte range [0, total).

    ``first_piece`` is the fast path of sequential access: Linux's virtio-fs driver puts the
    in-header, each argument struct and the out-header in a buffer of its own, so almost every
    read or write lies inside one view, and slicing that view directly spares the list of pieces,
    the bisect and the join (a request runs cold in a VM, where each Python call shows; issue 9).
    The offsets of the views are computed only when a range does cross views.
    """

    __slots__ = ("views", "total", "_starts")

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self.total = sum(map(len, views))
        self._starts: list[int] | None = None

    def _locate(self, pos: int) -> tuple[int, int]:
        """(index of the view holding byte ``pos``, offset in it); ``pos`` < total."""
        starts = self._starts
        if starts is None:
            starts = []
            at = 0
            for v in self.views:
                starts.append(at)
                at += len(v)
            self._starts = starts
        i = bisect.bisect_right(starts, pos) - 1
        return i, pos - starts[i]

    def first_piece(self, pos: int, size: int) -> memoryview | None:
        """The one view slice covering [pos, pos + size), or None if the range crosses views
        (the caller has checked the range and that ``size`` > 0)."""
        for v in self.views:  # a request has one to a few buffers: a walk beats a bisect
            n = len(v)
            if pos < n:
                return v[pos:pos + size] if pos + size <= n else None
            pos -= n
        return None

    def slices(self, pos: int, size: int) -> list[memoryview]:
        """Views covering [pos, pos + size) (the caller has checked the range)."""
        out: list[memoryview] = []
        if size <= 0:
            return out
        i, off = self._locate(pos)
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

    __slots__ = ("_seg", "_pos")

    def __init__(self, chain: DescriptorChain) -> None:
        self._seg = _Segments(chain.readable)
        self._pos = 0

    def remaining(self) -> int:
        return self._seg.total - self._pos

    def read(self, size: int) -> bytes:
        pos = self._pos
        if size <= 0 or size > self._seg.total - pos:
            if size == 0:
                return b""
            raise BufferTooSmall(f"read {size} with {self.remaining()} left")
        piece = self._seg.first_piece(pos, size)
        data = piece.tobytes() if piece is not None else b"".join(self._seg.slices(pos, size))
        self._pos = pos + size
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

    __slots__ = ("_seg", "_pos", "_high")

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
        src = data if type(data) is bytes else memoryview(data).cast("B")
        n = len(src)
        if n == 0:
            return
        piece = self._seg.first_piece(pos, n)
        if piece is not None:  # the usual case: the reply fits its (first) buffer
            piece[:] = src
            return
        src = memoryview(src)
        done = 0
        for dst in self._seg.slices(pos, n):
            dst[:] = src[done:done + len(dst)]
            done += len(dst)

    def write(self, data: bytes | memoryview) -> None:
        n = len(data) if type(data) is bytes else len(memoryview(data).cast("B"))
        if n > self._seg.total - self._pos:
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
        n = len(data) if type(data) is bytes else len(memoryview(data).cast("B"))
        if pos < 0 or pos + n > self._pos:
            raise BufferTooSmall(f"write_at {pos}+{n} beyond cursor {self._pos}")
        self._copy_in(pos, data)

    @property
    def bytes_written(self) -> int:
        return self._high
