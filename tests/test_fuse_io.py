"""BytesReader/BytesWriter must honour the Reader/Writer contract; LimitedReader must bound one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fuse.io import BufferTooSmall, BytesReader, BytesWriter, LimitedReader, Reader, Writer


def test_protocol_conformance() -> None:
    assert isinstance(BytesReader(b""), Reader)
    assert isinstance(BytesWriter(0), Writer)


def test_reader_exact_reads() -> None:
    r = BytesReader(b"abcdef")
    assert r.remaining() == 6
    assert r.read(2) == b"ab"
    assert r.read(0) == b""
    with pytest.raises(BufferTooSmall):
        r.read(5)
    assert r.remaining() == 4, "a failed read must not consume"
    with pytest.raises(BufferTooSmall):
        r.read(-1)
    assert r.read(4) == b"cdef" and r.remaining() == 0


def test_reader_to_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        r = BytesReader(b"HDR" + b"0123456789")
        r.read(3)
        assert r.read_to_fd(fd, 4, 100) == 4
        assert r.remaining() == 6
        assert r.read_to_fd(fd, 1000, 0) == 6  # bounded by what is left
        assert r.read_to_fd(fd, 10, 0) == 0
        assert os.pread(fd, 6, 0) == b"456789" and os.pread(fd, 4, 100) == b"0123"
    finally:
        os.close(fd)


def test_writer_write_skip_write_at() -> None:
    w = BytesWriter(10)
    w.skip(4)
    assert w.bytes_written == 4 and w.remaining() == 6
    w.write(b"xyz")
    with pytest.raises(BufferTooSmall):
        w.write(b"1234")
    assert w.remaining() == 3, "a failed write must not advance"
    w.write_at(0, b"HEAD")
    with pytest.raises(BufferTooSmall):
        w.write_at(5, b"abc")  # reaches past the cursor
    with pytest.raises(BufferTooSmall):
        w.skip(4)
    assert w.data == b"HEADxyz" and w.capacity == 10


def test_writer_from_fd(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        w = BytesWriter(8)
        w.skip(2)
        assert w.write_from_fd(fd, 3, 5) == 3
        assert w.write_from_fd(fd, 100, 0) == 3  # bounded by the room left
        assert w.remaining() == 0 and w.write_from_fd(fd, 1, 0) == 0
        assert w.data == bytes(2) + b"567012"
        w2 = BytesWriter(100)
        assert w2.write_from_fd(fd, 50, 8) == 2  # short at EOF
        assert w2.data == b"89" and w2.bytes_written == 2
    finally:
        os.close(fd)


def test_limited_reader_never_reads_past_its_limit(tmp_path: Path) -> None:
    inner = BytesReader(b"0123456789")
    r = LimitedReader(inner, 6)
    assert isinstance(r, Reader) and r.remaining() == 6
    assert r.read(2) == b"01"
    with pytest.raises(BufferTooSmall):
        r.read(5)  # the inner reader still has 8, but only 4 are the request's
    assert r.remaining() == 4 and inner.remaining() == 8, "a failed read must not consume"
    with pytest.raises(BufferTooSmall):
        r.read(-1)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert r.read_to_fd(fd, 100, 0) == 4  # bounded by the limit, not by the inner reader
        assert os.pread(fd, 100, 0) == b"2345"
        assert r.remaining() == 0 and inner.remaining() == 4
        assert r.read_to_fd(fd, 100, 0) == 0
    finally:
        os.close(fd)
