"""DAX over vhost-user: the back-end request channel (SET_SLAVE_REQ_FD, SLAVE_FS_MAP/FS_UNMAP).

The message layout is checked byte by byte; the two ends are real: a ``DaxWindow`` of reserved
address space with ``FsMapServer`` (the VMM's end) on one end of a real socketpair, a
``DaxWindow`` whose mapper is ``BackendChannel`` (the jailed child's end) on the other, real
files passed as SCM_RIGHTS and mmap'ed into the window, read back through its host address and
checked in /proc/self/maps. Hostile messages are written raw onto the socket. Finally our
front-end and our back-end negotiate the channel and a FUSE SETUPMAPPING served by the back-end's
device lands in the front-end's window.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from devices.memory import GuestMemory, map_memfd
from devices.virtio.fs.dax import INODE_FH, DaxWindow
from devices.virtio.fs.device import FsDevice
from devices.virtio.fs.options import FsOptions
from devices.virtio.vhost_user.backend_req import BackendChannel, FsMapServer
from devices.virtio.vhost_user.connection import Connection
from devices.virtio.vhost_user.frontend import (
    VhostUserFrontendError,
    VhostUserFsFrontend,
    VhostUserFsOptions,
)
from devices.virtio.vhost_user.protocol import (
    FS_BACKEND_MSG,
    FS_FLAG_MAP_R,
    FS_FLAG_MAP_W,
    FS_UNMAP_ALL,
    BackendRequest,
    FsMapEntry,
    ProtocolError,
    ProtocolFeature,
    decode_fs_backend_msg,
    decode_u64,
    encode_fs_backend_msg,
    encode_message,
    encode_request,
)
from devices.virtio.vhost_user.server import BackendServer
from fuse import abi
from fuse.abi import Opcode
from test_fuse_memfs import cstr, do_init, request, send
from tests.test_fs_dax import pattern, prot_at

PAGE = 4096
MiB = 1 << 20
WAIT_S = 30  # bounds a wait, never a timing assertion
R, W = FS_FLAG_MAP_R, FS_FLAG_MAP_W


# ---- the message ----------------------------------------------------------------------------

def test_fs_message_layout_is_four_arrays_of_eight_u64() -> None:
    raw = encode_fs_backend_msg([FsMapEntry(0x1000, 0x2000, 0x3000, R | W),
                                 FsMapEntry(0x5000, 0x6000, 0x7000, R)])
    assert len(raw) == FS_BACKEND_MSG.size == 256
    u64 = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, 256, 8)]
    assert u64[0:2] == [0x1000, 0x5000]        # fd_offset[]
    assert u64[8:10] == [0x2000, 0x6000]       # c_offset[]
    assert u64[16:18] == [0x3000, 0x7000]      # len[]
    assert u64[24:26] == [R | W, R]            # flags[]
    assert all(v == 0 for i, v in enumerate(u64) if i % 8 >= 2)
    assert decode_fs_backend_msg(raw) == [FsMapEntry(0x1000, 0x2000, 0x3000, R | W),
                                          FsMapEntry(0x5000, 0x6000, 0x7000, R)]


def test_fs_message_validation() -> None:
    with pytest.raises(ProtocolError, match="payload is 255 bytes"):
        decode_fs_backend_msg(bytes(255))
    bad = bytearray(encode_fs_backend_msg([FsMapEntry(0, 0, PAGE, R)]))
    bad[24 * 8 + 3 * 8] = 4                    # flags[3]: an unknown bit, even on an unused entry
    with pytest.raises(ProtocolError, match="entry 3: unknown flags 0x4"):
        decode_fs_backend_msg(bytes(bad))
    # entries of length 0 are unused (skipped), whatever their offsets say
    raw = FS_BACKEND_MSG.pack(*([7] * 8), *([9] * 8), *([0] * 8), *([0] * 8))
    assert decode_fs_backend_msg(raw) == []
    with pytest.raises(ValueError):
        encode_fs_backend_msg([FsMapEntry(0, 0, PAGE, R)] * 9)


# ---- the two ends on a socketpair -------------------------------------------------------------

class Pair:
    """The VMM's window + FsMapServer, the child's window over a BackendChannel."""

    def __init__(self, size: int = 16 * PAGE, max_files: int | None = None) -> None:
        self.vmm = DaxWindow(size, max_files=max_files)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server = FsMapServer(self.vmm, ours, "t")
        self.server.start()
        self.channel = BackendChannel(timeout=WAIT_S)
        self.channel.connect(theirs.detach())
        self.child = DaxWindow(size, mapper=self.channel)

    def close(self) -> None:
        self.child.close()
        self.server.close()
        self.vmm.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


@pytest.fixture
def datafile(tmp_path: Path) -> Path:
    f = tmp_path / "data"
    f.write_bytes(pattern(8 * PAGE, 5))
    return f


def child_map(p: Pair, path: Path, moffset: int, foffset: int, length: int, writable: bool,
              owner: int | None = None) -> None:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        p.child.map(moffset, fd, foffset, length, writable, owner)
    finally:
        os.close(fd)


def test_a_child_mapping_shows_the_file_in_the_vmm_window(pair: Pair, datafile: Path) -> None:
    assert prot_at(pair.child.host_addr or 1) != "r--s"   # the child's window maps nothing here
    child_map(pair, datafile, 2 * PAGE, PAGE, 3 * PAGE, False)
    assert ctypes.string_at(pair.vmm.host_addr + 2 * PAGE, 3 * PAGE) == pattern(8 * PAGE, 5)[PAGE:4 * PAGE]
    assert prot_at(pair.vmm.host_addr + 2 * PAGE) == "r--s"
    # same bookkeeping on both sides; the VMM does not know the child's handles
    assert pair.child.mappings() == [(2 * PAGE, 3 * PAGE, PAGE, False, None)]
    assert pair.vmm.mappings() == [(2 * PAGE, 3 * PAGE, PAGE, False, None)]
    assert pair.vmm.open_files == 1 and pair.vmm.metrics()["setups"] == 1
    assert pair.server.metrics()["fs_map"] == 1


def test_writes_through_the_vmm_window_reach_the_file(pair: Pair, datafile: Path) -> None:
    child_map(pair, datafile, 0, 0, PAGE, True)
    assert prot_at(pair.vmm.host_addr) == "rw-s"
    ctypes.memmove(pair.vmm.host_addr + 10, b"through the window", 18)
    assert datafile.read_bytes()[10:28] == b"through the window"


def test_unmap_drop_owner_and_reset_reach_the_vmm(pair: Pair, datafile: Path) -> None:
    child_map(pair, datafile, 0, 0, 2 * PAGE, False)
    pair.child.unmap(0, PAGE)
    assert prot_at(pair.vmm.host_addr) == "---p" and prot_at(pair.vmm.host_addr + PAGE) == "r--s"
    assert pair.vmm.mappings() == [(PAGE, PAGE, PAGE, False, None)]
    child_map(pair, datafile, 4 * PAGE, 0, PAGE, False, owner=7)
    assert pair.child.drop_owner(7) == 1
    assert prot_at(pair.vmm.host_addr + 4 * PAGE) == "---p"
    assert pair.vmm.mappings() == [(PAGE, PAGE, PAGE, False, None)]
    pair.child.reset()
    assert pair.vmm.mappings() == [] and pair.vmm.open_files == 0
    assert prot_at(pair.vmm.host_addr + PAGE) == "---p"


def test_a_refused_mapping_changes_nothing_on_either_side(pair: Pair, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as err:      # writable mapping of a read-only descriptor
            pair.child.map(0, fd, 0, PAGE, True)
    finally:
        os.close(fd)
    assert err.value.errno == errno.EACCES
    assert pair.child.mappings() == [] == pair.vmm.mappings()
    assert pair.vmm.open_files == 0 and pair.child.open_files == 0
    assert pair.server.metrics()["refused"] == 1


def test_truncation_repair_works_on_the_vmm_window(pair: Pair, datafile: Path) -> None:
    child_map(pair, datafile, 0, 0, 4 * PAGE, False)
    os.truncate(datafile, PAGE)
    assert pair.child.repair_truncated() == 0           # not the child's business
    assert pair.vmm.repair_truncated() == 1
    assert ctypes.string_at(pair.vmm.host_addr + PAGE, PAGE) == bytes(PAGE)


def test_vmm_bounds_the_files_a_child_makes_it_hold(tmp_path: Path) -> None:
    p = Pair(max_files=2)
    try:
        files = []
        for i in range(3):
            f = tmp_path / f"f{i}"
            f.write_bytes(pattern(PAGE, i))
            files.append(f)
        child_map(p, files[0], 0, 0, PAGE, False)
        child_map(p, files[1], PAGE, 0, PAGE, False)
        with pytest.raises(OSError) as err:
            child_map(p, files[2], 2 * PAGE, 0, PAGE, False)
        assert err.value.errno == errno.ENFILE
        assert p.vmm.open_files == 2 and len(p.child.mappings()) == 2
    finally:
        p.close()


def test_without_a_channel_a_mapping_fails_with_enodev(datafile: Path) -> None:
    child = DaxWindow(4 * PAGE, mapper=BackendChannel())
    try:
        fd = os.open(datafile, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as err:
                child.map(0, fd, 0, PAGE, False)
        finally:
            os.close(fd)
        assert err.value.errno == errno.ENODEV and child.mappings() == []
        child.reset()          # nothing mapped: sends nothing, raises nothing
    finally:
        child.close()


def test_a_broken_channel_fails_every_later_request_with_eio(pair: Pair, datafile: Path) -> None:
    child_map(pair, datafile, 0, 0, PAGE, False)
    pair.server.close()                      # the VMM's end goes away
    for _ in range(2):
        with pytest.raises(OSError) as err:
            child_map(pair, datafile, PAGE, 0, PAGE, False)
        assert err.value.errno == errno.EIO
    pair.child.reset()                       # logged, not raised: the session still ends


# ---- hostile messages, written raw ------------------------------------------------------------

@pytest.fixture
def raw(pair: Pair):
    """Replace the child's end by a raw connection the test writes anything onto."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pair.server.close()
    pair.server = FsMapServer(pair.vmm, ours, "t")
    pair.server.start()
    conn = Connection(theirs, timeout=WAIT_S)
    yield pair, conn
    conn.close()


def exchange(conn: Connection, request: int, entries: list[FsMapEntry], fds=(),
             payload: bytes | None = None) -> int:
    body = encode_fs_backend_msg(entries) if payload is None else payload
    conn.send(encode_request(request, body, need_reply=True), fds)
    reply = conn.recv_reply()
    assert reply.request == request
    return decode_u64(reply.payload)


def test_hostile_requests_get_an_error_ack_and_change_nothing(raw, datafile: Path) -> None:
    pair, conn = raw
    fd = os.open(datafile, os.O_RDONLY)
    rfd, wfd = os.pipe()
    size = pair.vmm.size
    try:
        cases = [
            (BackendRequest.FS_MAP, [FsMapEntry(0, size, PAGE, R)], [fd], errno.EINVAL),  # past the end
            (BackendRequest.FS_MAP, [FsMapEntry(0, size - PAGE, 2 * PAGE, R)], [fd], errno.EINVAL),
            (BackendRequest.FS_MAP, [FsMapEntry(0, (1 << 64) - PAGE, PAGE, R)], [fd], errno.EINVAL),
            (BackendRequest.FS_MAP, [FsMapEntry(0, 100, PAGE, R)], [fd], errno.EINVAL),  # unaligned
            (BackendRequest.FS_MAP, [FsMapEntry(0, 0, 100, R)], [fd], errno.EINVAL),
            (BackendRequest.FS_MAP, [FsMapEntry(5, 0, PAGE, R)], [fd], errno.EINVAL),    # file offset
            (BackendRequest.FS_MAP, [FsMapEntry(0, 0, PAGE, W)], [fd], errno.EINVAL),    # W without R
            (BackendRequest.FS_MAP, [FsMapEntry(0, 0, PAGE, R)], [], errno.EINVAL),      # no fd
            (BackendRequest.FS_MAP, [FsMapEntry(0, 0, PAGE, R)], [fd, fd], errno.EINVAL),
            (BackendRequest.FS_MAP, [FsMapEntry(0, 0, PAGE, R)], [rfd], errno.EINVAL),   # a pipe
            (BackendRequest.FS_MAP, [], [fd], errno.EINVAL),                             # no range
            (BackendRequest.FS_MAP, [FsMapEntry(0, 0, PAGE, R | W)], [fd], errno.EACCES),
            # all or nothing: the first entry is fine, the second is not
            (BackendRequest.FS_MAP, [FsMapEntry(0, 0, PAGE, R), FsMapEntry(0, 3, PAGE, R)], [fd],
             errno.EINVAL),
            (BackendRequest.FS_UNMAP, [FsMapEntry(0, 0, PAGE, 0)], [fd], errno.EINVAL),  # an fd
            (BackendRequest.FS_UNMAP, [FsMapEntry(0, PAGE, size, 0)], [], errno.EINVAL),
            (BackendRequest.FS_UNMAP, [FsMapEntry(0, PAGE, FS_UNMAP_ALL, 0)], [], errno.EINVAL),
            (BackendRequest.FS_SYNC, [FsMapEntry(0, 0, PAGE, 0)], [], errno.EOPNOTSUPP),
            (99, [], [], errno.EOPNOTSUPP),
        ]
        for request, entries, fds, want in cases:
            assert exchange(conn, request, entries, fds) == want, (request, entries, fds)
            assert pair.vmm.mappings() == [] and pair.vmm.open_files == 0
        # flags with an unknown bit, a short payload
        bad = FS_BACKEND_MSG.pack(*([0] * 8), *([0] * 8), PAGE, *([0] * 7), 8, *([0] * 7))
        assert exchange(conn, BackendRequest.FS_MAP, [], [fd], payload=bad) == errno.EINVAL
        assert exchange(conn, BackendRequest.FS_MAP, [], [fd], payload=bytes(8)) == errno.EINVAL
        assert pair.server.metrics()["refused"] == len(cases) + 2
        # the channel still works: a good request, then "unmap everything"
        assert exchange(conn, BackendRequest.FS_MAP, [FsMapEntry(0, PAGE, PAGE, R)], [fd]) == 0
        assert prot_at(pair.vmm.host_addr + PAGE) == "r--s"
        assert exchange(conn, BackendRequest.FS_UNMAP, [FsMapEntry(0, 0, FS_UNMAP_ALL, 0)]) == 0
        assert pair.vmm.mappings() == [] and prot_at(pair.vmm.host_addr + PAGE) == "---p"
    finally:
        for x in (fd, rfd, wfd):
            os.close(x)
    # every descriptor the VMM received was closed: only the test's own are open
    assert pair.vmm.open_files == 0


def test_a_malformed_frame_ends_the_channel_not_the_vmm(raw) -> None:
    pair, conn = raw
    conn.send(encode_message(BackendRequest.FS_MAP, b"", flags=0))    # protocol version 0
    deadline = time.monotonic() + WAIT_S
    while pair.server.ended is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "version" in pair.server.ended


# ---- our front-end and our back-end negotiate it -------------------------------------------

@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="pyvmm-dax-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class DaxBackend:
    def __init__(self, share: Path, sockdir: Path, dax: bool) -> None:
        self.channel = BackendChannel(timeout=WAIT_S) if dax else None
        extra = {"dax": True, "dax_window_mib": 2} if dax else {}
        self.device = FsDevice(FsOptions(source=str(share), tag="share", sandbox="none", **extra),
                               dax_mapper=self.channel)
        self.path = str(sockdir / "fs.sock")
        self.server = BackendServer(self.device, self.path, timeout=WAIT_S,
                                    backend_channel=self.channel)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.request_stop()
        self.thread.join(WAIT_S)
        self.server.close()
        self.device.close()


def test_front_end_and_back_end_map_through_the_channel(tmp_path: Path, sockdir: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(pattern(4 * PAGE, 3))
    backend = DaxBackend(share, sockdir, dax=True)
    memory = GuestMemory.from_ranges([(0, 16 * MiB)], backing=map_memfd)
    frontend = None
    try:
        frontend = VhostUserFsFrontend(VhostUserFsOptions(backend.path, "share"), memory,
                                       timeout=WAIT_S, dax_window_size=2 * MiB)
        assert frontend.protocol_features >> ProtocolFeature.SLAVE_REQ & 1
        deadline = time.monotonic() + WAIT_S
        while not backend.channel.connected:
            assert time.monotonic() < deadline, "SET_SLAVE_REQ_FD never reached the back-end"
            time.sleep(0.01)
        frontend.place_dax_window(4 << 30)
        assert frontend.shm_regions == {0: (4 << 30, 2 * MiB)}
        # a FUSE SETUPMAPPING served by the back-end's device (as its worker would)
        s, vmm = backend.device.server, frontend.dax_window
        do_init(s)
        r = send(s, request(Opcode.LOOKUP, cstr(b"f")))
        nid = abi.ENTRY_OUT.unpack(r.payload).nodeid
        body = abi.SETUPMAPPING_IN.pack(fh=INODE_FH, foffset=0, len=2 * MiB,
                                        flags=abi.FUSE_SETUPMAPPING_FLAG_READ, moffset=0)
        r = send(s, request(Opcode.SETUPMAPPING, body, nodeid=nid))
        assert r is not None and r.error == 0
        assert ctypes.string_at(vmm.host_addr, 4 * PAGE) == pattern(4 * PAGE, 3)
        assert frontend.metrics()["dax"]["setups"] == 1
        assert frontend.metrics()["dax"]["channel"]["fs_map"] == 1
        # the guest's FUSE session ends: the back-end's window unmaps, and so does ours
        backend.device.reset()
        assert vmm.mappings() == [] and prot_at(vmm.host_addr) == "---p"
    finally:
        if frontend is not None:
            frontend.close()
        backend.close()
        memory.close()


def test_a_back_end_without_the_channel_gets_no_dax_window(tmp_path: Path, sockdir: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    backend = DaxBackend(share, sockdir, dax=False)
    memory = GuestMemory.from_ranges([(0, 16 * MiB)], backing=map_memfd)
    try:
        with pytest.raises(VhostUserFrontendError, match="does not offer SLAVE_REQ") as err:
            VhostUserFsFrontend(VhostUserFsOptions(backend.path, "share"), memory,
                                timeout=WAIT_S, dax_window_size=2 * MiB)
        assert "\n" not in str(err.value)
    finally:
        backend.close()
        memory.close()
