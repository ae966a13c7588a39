"""Property tests: no request, however malformed, escapes Server.handle or gives a bad reply."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse import abi
from fuse.abi import Opcode
from fuse.io import BytesReader, BytesWriter
from fuse.metrics import Metrics
from fuse.server import Server
from test_fuse_memfs import MemFS, do_init, request

OPCODES = [int(op) for op in Opcode] + [0, 7, 19, 52, 4096, 2**32 - 1]


@pytest.fixture(scope="module", params=["memfs", "passthrough"])
def fuzz_server(request):
    """The in-memory test filesystem, and the real passthrough on a temporary share."""
    with tempfile.TemporaryDirectory() as d:
        if request.param == "memfs":
            fs = MemFS(Path(d))
            for i in range(5):
                fs.add_file(1, b"f%d" % i, b"x" * (i * 1000))
        else:
            share = Path(d) / "share"
            share.mkdir()
            for i in range(5):
                (share / f"f{i}").write_bytes(b"x" * (i * 1000))
            (share / "sub").mkdir()
            os.symlink("../outside", share / "link")
            fs = PassthroughFs(FsOptions(source=str(share), tag="fuzz"))
        s = Server(fs, max_write=64 * 1024, metrics=Metrics())
        do_init(s)
        yield s, fs
        if request.param == "memfs":
            fs.close()
        else:
            s.end_session()
            assert sorted(os.listdir(d)) == ["share"]  # nothing was created beside the share


def check(server: Server, data: bytes, capacity: int) -> None:
    w = BytesWriter(capacity)
    n = server.handle(BytesReader(data), w)
    assert isinstance(n, int) and n >= 0
    if n == 0:
        return
    raw = w.data
    assert n >= abi.OUT_HEADER.size and n <= capacity and n <= len(raw)
    ln, err, unique = abi.OUT_HEADER.struct.unpack_from(raw)
    assert ln == n
    assert err <= 0 and err > -4096
    if err:
        assert ln == abi.OUT_HEADER.size
    assert len(data) >= abi.IN_HEADER.size
    assert unique == abi.IN_HEADER.unpack(data).unique


def _keep_serving(server: Server) -> None:
    fs = server.fs
    if isinstance(fs, PassthroughFs):  # no request may leave a table lock held
        assert not fs._inodes._pins.lock.held() and not fs._handles._pins.lock.held()
    if not server.initialized:  # a fuzzed DESTROY or failed re-INIT ended the session
        do_init(server)
    w = BytesWriter(4096)
    assert server.handle(BytesReader(request(Opcode.STATFS, unique=424242)), w) > 0
    assert abi.OUT_HEADER.unpack(w.data).error == 0


common = settings(max_examples=400, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])


@common
@given(data=st.binary(max_size=300), capacity=st.integers(0, 600))
def test_random_bytes(fuzz_server, data: bytes, capacity: int) -> None:
    server, _ = fuzz_server
    check(server, data, capacity)
    _keep_serving(server)


@common
@given(opcode=st.sampled_from(OPCODES), body=st.binary(max_size=400),
       nodeid=st.sampled_from([0, 1, 2, 3, 4, 99, 2**64 - 1]),
       unique=st.integers(0, 2**64 - 1), extlen=st.sampled_from([0, 0, 0, 1, 0xFFFF]),
       len_delta=st.sampled_from([0, 0, 0, -1, 1, -41, 1 << 20]),
       capacity=st.sampled_from([0, 15, 16, 17, 100, 144, 4096, 70000]))
def test_valid_headers_random_bodies(fuzz_server, opcode: int, body: bytes, nodeid: int,
                                     unique: int, extlen: int, len_delta: int,
                                     capacity: int) -> None:
    server, _ = fuzz_server
    length = max(0, min(2**32 - 1, abi.IN_HEADER.size + len(body) + len_delta))
    data = request(opcode, body, nodeid=nodeid, unique=unique, length=length,
                   total_extlen=extlen)
    check(server, data, capacity)
    _keep_serving(server)


def _struct_body(layout: abi.Layout) -> st.SearchStrategy[bytes]:
    # Plausible numbers (small ints, boundaries) in every field, then an optional name tail.
    nums = st.sampled_from([0, 1, 2, 3, 100, 4096, 2**31, 2**32 - 1, 2**63, 2**64 - 1])

    def pack(values: list[int]) -> bytes:
        flat = []
        for ch, v in zip(_flat_chars(layout), values):
            bits = {"B": 8, "H": 16, "I": 32, "i": 32, "Q": 64, "q": 64}[ch]
            v &= (1 << bits) - 1
            if ch in "iq" and v >= 1 << (bits - 1):
                v -= 1 << bits
            flat.append(v)
        return layout.struct.pack(*flat)

    return st.lists(nums, min_size=len(_flat_chars(layout)),
                    max_size=len(_flat_chars(layout))).map(pack)


def _flat_chars(layout: abi.Layout) -> list[str]:
    chars = []
    for count, ch in re.findall(r"(\d*)([BbHhIiQqx])", layout.struct.format.lstrip("<")):
        if ch == "x":
            continue
        chars += [ch] * (int(count) if count else 1)
    return chars


IN_ARGS = {
    Opcode.GETATTR: abi.GETATTR_IN, Opcode.SETATTR: abi.SETATTR_IN,
    Opcode.MKNOD: abi.MKNOD_IN, Opcode.MKDIR: abi.MKDIR_IN, Opcode.RENAME: abi.RENAME_IN,
    Opcode.RENAME2: abi.RENAME2_IN, Opcode.LINK: abi.LINK_IN, Opcode.OPEN: abi.OPEN_IN,
    Opcode.CREATE: abi.CREATE_IN, Opcode.READ: abi.READ_IN, Opcode.WRITE: abi.WRITE_IN,
    Opcode.RELEASE: abi.RELEASE_IN, Opcode.FSYNC: abi.FSYNC_IN, Opcode.FLUSH: abi.FLUSH_IN,
    Opcode.OPENDIR: abi.OPEN_IN, Opcode.READDIR: abi.READ_IN,
    Opcode.READDIRPLUS: abi.READ_IN, Opcode.RELEASEDIR: abi.RELEASE_IN,
    Opcode.FSYNCDIR: abi.FSYNC_IN, Opcode.ACCESS: abi.ACCESS_IN,
    Opcode.GETXATTR: abi.GETXATTR_IN, Opcode.LISTXATTR: abi.GETXATTR_IN,
    Opcode.SETXATTR: abi.GETXATTR_IN, Opcode.FALLOCATE: abi.FALLOCATE_IN,
    Opcode.LSEEK: abi.LSEEK_IN, Opcode.COPY_FILE_RANGE: abi.COPY_FILE_RANGE_IN,
    Opcode.FORGET: abi.FORGET_IN, Opcode.BATCH_FORGET: abi.BATCH_FORGET_IN,
    Opcode.INTERRUPT: abi.INTERRUPT_IN, Opcode.INIT: abi.INIT_IN,
    Opcode.LOOKUP: None, Opcode.UNLINK: None, Opcode.RMDIR: None, Opcode.SYMLINK: None,
    Opcode.REMOVEXATTR: None, Opcode.READLINK: None, Opcode.STATFS: None,
    Opcode.DESTROY: None,
}

names = st.sampled_from([b"", b"f0\0", b"f1\0", b"new\0", b".\0", b"..\0", b"a/b\0", b"x",
                         b"f2\0f3\0", b"f0\0zz\0", b"\0\0", b"user.x\0v"])


@st.composite
def structured_request(draw):
    op = draw(st.sampled_from(sorted(IN_ARGS)))
    layout = IN_ARGS[op]
    body = draw(_struct_body(layout)) if layout is not None else b""
    body += draw(names) + draw(st.binary(max_size=8))
    if draw(st.booleans()):
        body = body[:draw(st.integers(0, len(body)))]
    nodeid = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 100, 0]))
    return request(op, body, nodeid=nodeid, unique=draw(st.integers(0, 2**64 - 1)))


@common
@given(req=structured_request(), capacity=st.sampled_from([16, 60, 200, 4096, 70000]))
def test_structured_requests(fuzz_server, req: bytes, capacity: int) -> None:
    server, fs = fuzz_server
    check(server, req, capacity)
    _keep_serving(server)
