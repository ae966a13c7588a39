"""RequestBuffer/ReplyBuffer: the /dev/fuse transport's Reader/Writer, reused for every request."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devices.fusedev.buffers import ReplyBuffer, RequestBuffer
from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse import abi
from fuse.io import BufferTooSmall, Reader, Writer
from fuse.server import Server


def test_protocol_conformance() -> None:
    assert isinstance(RequestBuffer(16), Reader)
    assert isinstance(ReplyBuffer(16), Writer)


def test_request_buffer_reads_only_the_loaded_request() -> None:
    r = RequestBuffer(16)
    r.buf[:10] = b"abcdefghij"
    r.load(6)
    assert r.remaining() == 6 and r.read(2) == b"ab"
    with pytest.raises(BufferTooSmall):
        r.read(5)                       # bytes 6..9 of the buffer are not part of the request
    assert r.remaining() == 4, "a failed read must not consume"
    assert r.read(4) == b"cdef"
    r.load(3)                           # the next request starts from the front again
    assert r.read(3) == b"abc"
    with pytest.raises(ValueError):
        r.load(17)


def test_request_buffer_to_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        r = RequestBuffer(32)
        r.buf[:13] = b"HDR0123456789"
        r.load(13)
        r.read(3)
        assert r.read_to_fd(fd, 100, 5) == 10      # bounded by the request, not the buffer
        assert r.read_to_fd(fd, 10, 0) == 0
        assert os.pread(fd, 10, 5) == b"0123456789"
    finally:
        os.close(fd)


def test_reply_buffer_reuse_skip_write_at_and_from_fd(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        w = ReplyBuffer(12)
        w.skip(4)
        assert w.write_from_fd(fd, 100, 2) == 8     # bounded by the room left
        w.write_at(0, b"HEAD")
        with pytest.raises(BufferTooSmall):
            w.write(b"x")
        assert bytes(w.reply(w.bytes_written)) == b"HEAD23456789"
        with pytest.raises(ValueError):
            w.reply(13)
        w.clear()
        assert w.remaining() == 12 and w.bytes_written == 0
        w.write(b"ab")
        with pytest.raises(BufferTooSmall):
            w.write_at(1, b"xy")                    # past the cursor of the new reply
        assert bytes(w.reply(2)) == b"ab"
    finally:
        os.close(fd)


def _request(opcode: int, unique: int, nodeid: int, body: bytes) -> bytes:
    return abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(body), opcode=opcode, unique=unique,
                              nodeid=nodeid, uid=0, gid=0, pid=1) + body


def test_server_round_trip_through_the_buffers(tmp_path: Path) -> None:
    """INIT as the host kernel sends it (a newer minor than ours), then a LOOKUP and a READ
    answered into the same reused buffers."""
    (tmp_path / "hello").write_bytes(b"hello world")
    server = Server(PassthroughFs(FsOptions(source=str(tmp_path), tag="t")))
    req, rep = RequestBuffer(server.max_request), ReplyBuffer(16 + server.max_write)

    def call(data: bytes) -> bytes:
        req.buf[:len(data)] = data
        req.load(len(data))
        rep.clear()
        return bytes(rep.reply(server.handle(req, rep)))

    init = abi.INIT_IN.pack(major=7, minor=44, max_readahead=1 << 17,
                            flags=abi.FUSE_INIT_EXT | abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES,
                            flags2=0)
    out = call(_request(abi.Opcode.INIT, 1, 0, init))
    hdr = abi.OUT_HEADER.unpack(out[:16])
    assert hdr.error == 0 and hdr.unique == 1 and hdr.len == len(out)
    reply = abi.INIT_OUT.unpack(out[16:16 + abi.INIT_OUT.size])
    assert (reply.major, reply.minor) == (7, abi.FUSE_KERNEL_MINOR_VERSION)

    out = call(_request(abi.Opcode.LOOKUP, 2, 1, b"hello\0"))
    assert abi.OUT_HEADER.unpack(out[:16]).error == 0
    nodeid = abi.ENTRY_OUT.unpack(out[16:16 + abi.ENTRY_OUT.size]).nodeid
    out = call(_request(abi.Opcode.OPEN, 3, nodeid, abi.OPEN_IN.pack(flags=os.O_RDONLY,
                                                                       open_flags=0)))
    fh = abi.OPEN_OUT.unpack(out[16:16 + abi.OPEN_OUT.size]).fh
    out = call(_request(abi.Opcode.READ, 4, nodeid, abi.READ_IN.pack(
        fh=fh, offset=6, size=100, read_flags=0, lock_owner=0, flags=0, padding=0)))
    assert out[16:] == b"world" and abi.OUT_HEADER.unpack(out[:16]).len == 21
    # FORGET gets no reply at all: nothing to write to /dev/fuse.
    assert call(_request(abi.Opcode.FORGET, 5, nodeid, abi.FORGET_IN.pack(nlookup=1))) == b""
