"""Reader/Writer over descriptor chains: FUSE-style I/O moving real file data into fake guest memory."""

from __future__ import annotations

import os

import pytest

from devices.memory import GuestMemory
from devices.virtio.chain import ChainReader, ChainWriter
from devices.virtio.queue import Queue
from fuse.io import BufferTooSmall, BytesWriter, Reader, Writer
from tests.fakes import FakeDriverQueue


def chain_of(readable: list[bytes], writable: list[int], *, size: int = 16, indirect: bool = False):
    mem = GuestMemory.from_ranges([(0, 4 << 20)])
    drv = FakeDriverQueue(mem, size, 0x1000, 0x40000)
    q = Queue(mem, size, drv.desc, drv.avail, drv.used, False, indirect=True)
    _, outs = drv.add_chain(readable, writable, indirect=indirect)
    return mem, outs, q.pop()


def guest_reply(mem, outs, writable, n):
    data = b"".join(mem.read(a, n) for a, n in zip(outs, writable))
    return data[:n]


def test_they_implement_the_fuse_io_protocols():
    _, _, chain = chain_of([b"x"], [1])
    assert isinstance(ChainReader(chain), Reader)
    assert isinstance(ChainWriter(chain), Writer)


def test_reader_reads_across_segments():
    _, _, chain = chain_of([b"abc", b"defg", b"h"], [], indirect=True)
    r = ChainReader(chain)
    assert r.remaining() == 8
    assert r.read(2) == b"ab"
    assert r.read(4) == b"cdef"
    with pytest.raises(BufferTooSmall):
        r.read(3)
    assert r.remaining() == 2  # a failed read consumes nothing
    assert r.read(2) == b"gh"
    assert r.read(0) == b""


def test_reader_read_to_fd_moves_request_payload_into_a_file(tmp_path):
    header = b"H" * 40
    payload = [os.urandom(1000), os.urandom(3000), os.urandom(5)]
    _, _, chain = chain_of([header] + payload, [16])
    r = ChainReader(chain)
    assert r.read(40) == header
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert r.read_to_fd(fd, 4005, 100) == 4005
        assert r.remaining() == 0
        assert r.read_to_fd(fd, 10, 0) == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 100 + b"".join(payload)


def test_reader_read_to_fd_is_capped_by_size(tmp_path):
    _, _, chain = chain_of([b"0123456789"], [])
    r = ChainReader(chain)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert r.read_to_fd(fd, 4, 0) == 4
    finally:
        os.close(fd)
    assert r.read(6) == b"456789"


def test_writer_header_after_payload_like_a_fuse_reply():
    writable = [5, 7, 20]
    mem, outs, chain = chain_of([b"req"], writable)
    w = ChainWriter(chain)
    assert w.remaining() == 32
    w.skip(16)  # room for fuse_out_header
    w.write(b"payload-bytes")
    w.write_at(0, b"0123456789abcdef")
    assert w.bytes_written == 29
    assert guest_reply(mem, outs, writable, 29) == b"0123456789abcdefpayload-bytes"
    with pytest.raises(BufferTooSmall):
        w.write_at(20, b"0123456789")  # beyond the cursor
    with pytest.raises(BufferTooSmall):
        w.write(b"x" * 4)
    assert w.remaining() == 3 and w.bytes_written == 29  # nothing was written
    with pytest.raises(BufferTooSmall):
        w.skip(4)


def test_writer_write_from_fd_moves_file_data_into_guest_buffers(tmp_path):
    data = os.urandom(10000)
    path = tmp_path / "src"
    path.write_bytes(data)
    writable = [16, 4096, 4096, 4096]
    mem, outs, chain = chain_of([b"req"], writable, indirect=True)
    w = ChainWriter(chain)
    w.skip(16)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert w.write_from_fd(fd, 8000, 1234) == 8000
        # asking past EOF moves what there is
        assert w.write_from_fd(fd, 4000, 9234) == 766
    finally:
        os.close(fd)
    assert w.bytes_written == 16 + 8766
    assert guest_reply(mem, outs, writable, 16 + 8766)[16:] == data[1234:]


def test_writer_more_segments_than_iov_max(tmp_path):
    # 1500 one-byte buffers: preadv must be split into IOV_MAX-sized batches
    data = os.urandom(1500)
    path = tmp_path / "src"
    path.write_bytes(data)
    writable = [1] * 1500
    mem, outs, chain = chain_of([b"r"], writable, size=2048)
    assert len(chain.writable) == 1500
    w = ChainWriter(chain)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert w.write_from_fd(fd, 1500, 0) == 1500
    finally:
        os.close(fd)
    assert guest_reply(mem, outs, writable, 1500) == data


def test_writer_matches_bytes_writer():
    writable = [3, 1, 9, 4]
    mem, outs, chain = chain_of([b"r"], writable)
    ours, ref = ChainWriter(chain), BytesWriter(17)
    for w in (ours, ref):
        w.skip(2)
        w.write(b"abcdef")
        w.write_at(0, b"XY")
        w.write(memoryview(b"0123456"))
        w.write_at(5, b"--")
    assert ours.bytes_written == ref.bytes_written
    assert guest_reply(mem, outs, writable, ours.bytes_written) == ref.data
