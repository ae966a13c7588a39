"""The vhost-user back-end driven by a Python front-end written here, as QEMU drives it.

Real parts throughout: guest RAM is memfds that the back-end mmaps from the descriptors we send
with SCM_RIGHTS, the rings are laid out in that RAM by tests.fakes.FakeDriverQueue (Linux's
split-ring layout), kicks and calls are real eventfds, and requests are real FUSE requests served
by the real FsDevice over a PassthroughFs on a temporary directory. The back-end runs
`BackendServer.serve_connection` (or `serve`, on a listening socket) in a thread of this process,
so the tests can also check that every descriptor and mapping a session received is released.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

import pytest

from devices.virtio.fs.device import FsDevice
from devices.virtio.fs.options import FsOptions
from devices.virtio.vhost_user.protocol import (
    HEADER,
    MEMORY_HEADER,
    ConfigSpace,
    MemoryRegion,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
    decode_u64,
    encode_memory_table,
    encode_request,
    encode_u64,
)
from devices.virtio.vhost_user.server import BackendServer, SocketInUse
from fuse import abi
from tests.fakes import FakeDriverQueue
from tests.vhost_user_support import PROTOCOL_FEATURES_BIT, WAIT_S, Frontend, MemfdGuest, serve_in_thread

MiB = 1 << 20
QSIZE = 64
VERSION_1 = 1 << 32
INDIRECT_DESC = 1 << 28
EVENT_IDX = 1 << 29


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def fs_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("virtio-fs:")]


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/memfd:guest-ram" in line)


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_bytes(b"hello from the host\n")
    return d


class Rig:
    """Back-end thread + front-end + guest RAM + driver rings for both virtio-fs queues."""

    def __init__(self, share, *, regions=((0, 16 * MiB),), ring_base=0x10000, **options) -> None:
        self.device = FsDevice(FsOptions(source=str(share), tag="share", **options))
        self.server = BackendServer(self.device, None, timeout=WAIT_S)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.thread = serve_in_thread(self.server, b)
        self.fe = Frontend(a)
        self.guest = MemfdGuest(list(regions))
        self.queues = [FakeDriverQueue(self.guest, QSIZE, ring_base + 0x10000 * i, ring_base + MiB * (i + 1))
                       for i in range(2)]
        self.unique = 0

    def up(self, *, features: int | None = None, enable: bool = True) -> None:
        self.fe.negotiate(features)
        assert self.fe.set_mem_table(self.guest) == 0
        for i, q in enumerate(self.queues):
            self.fe.setup_ring(i, q, self.guest, enable=enable)
        self.sync()

    def sync(self) -> None:
        """A request with a reply: everything sent before it has been processed."""
        assert self.fe.u64(Request.GET_QUEUE_NUM) == 2

    def submit(self, qi: int, readable: list[bytes], writable: list[int], *, kick: bool = True):
        q = self.queues[qi]
        want = (q.used_idx() + 1) & 0xFFFF
        q.set_used_event(q.used_idx())
        head, outs = q.add_chain(readable, writable)
        if kick:
            self.fe.kick(qi)
        deadline = time.monotonic() + WAIT_S
        calls = 0
        while q.used_idx() != want or not calls:  # used_event asks for exactly this interrupt
            calls += self.fe.wait_call(qi, max(0.0, deadline - time.monotonic()))
        used_id, used_len = q.used_elems()[-1]
        assert used_id == head
        return used_len, b"".join(self.guest.read(a, n) for a, n in zip(outs, writable))[:used_len]

    def fuse(self, opcode: int, nodeid: int, args: bytes, out_size: int, *, qi: int = 1, kick: bool = True):
        self.unique += 1
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(args), opcode=opcode, unique=self.unique,
                                 nodeid=nodeid, uid=os.getuid(), gid=os.getgid(), pid=1)
        used, reply = self.submit(qi, [hdr] + ([args] if args else []), [abi.OUT_HEADER.size + out_size],
                                  kick=kick)
        out = abi.OUT_HEADER.unpack(reply[:abi.OUT_HEADER.size])
        assert out.unique == self.unique and out.len == used
        return -out.error, reply[abi.OUT_HEADER.size:]

    def init(self, **kw) -> None:
        err, _ = self.fuse(abi.Opcode.INIT, 0, abi.INIT_IN.pack(major=7, minor=37, max_readahead=1 << 17,
                                                                flags=0), abi.INIT_OUT.size, **kw)
        assert err == 0

    def lookup(self, name: bytes):
        return self.fuse(abi.Opcode.LOOKUP, 1, name + b"\0", abi.ENTRY_OUT.size)

    def ended(self) -> bool:
        self.thread.join(WAIT_S)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.fe.close()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        self.device.close()
        self.server.close()
        self.guest.close()


@pytest.fixture
def rig_factory(share):
    rigs = []

    def make(**kw) -> Rig:
        rigs.append(Rig(share, **kw))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


@pytest.fixture
def rig(rig_factory) -> Rig:
    return rig_factory()


# -- what we offer -----------------------------------------------------------------------------------
def test_offers(rig):
    fe = rig.fe
    features = fe.u64(Request.GET_FEATURES)
    assert features == VERSION_1 | INDIRECT_DESC | EVENT_IDX | PROTOCOL_FEATURES_BIT
    proto = fe.u64(Request.GET_PROTOCOL_FEATURES)
    assert proto == (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
    assert fe.u64(Request.GET_QUEUE_NUM) == 2
    cfg = ConfigSpace.decode(fe.call(Request.GET_CONFIG, ConfigSpace(0, 40, 0, bytes(40)).encode()).payload)
    assert cfg.data == b"share".ljust(36, b"\0") + (1).to_bytes(4, "little")
    part = ConfigSpace.decode(fe.call(Request.GET_CONFIG, ConfigSpace(36, 4, 0, bytes(4)).encode()).payload)
    assert (part.offset, part.data) == (36, (1).to_bytes(4, "little"))


def test_get_config_errors_are_empty_replies(rig):
    for window in (ConfigSpace(0, 41, 0, bytes(41)), ConfigSpace(40, 1, 0, b"\0"),
                   ConfigSpace(0xFFFFFFFF, 4, 0, bytes(4))):
        reply = rig.fe.call(Request.GET_CONFIG, window.encode())
        assert reply.payload == b""
    reply = rig.fe.call(Request.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)).encode()[:-1])  # short payload
    assert reply.payload == b""
    rig.sync()  # still connected
    assert rig.server.counters.refused == 4


# -- serving requests --------------------------------------------------------------------------------
def test_fuse_requests_through_vhost_user(rig_factory, share):
    rig = rig_factory(negative_timeout=60)
    rig.up()
    assert rig.server.counters.activations == 1 and [t.name for t in fs_threads()] == ["virtio-fs:share"]
    rig.init()
    err, body = rig.lookup(b"hello.txt")
    assert err == 0
    entry = abi.ENTRY_OUT.unpack(body)
    assert entry.nodeid > 1 and entry.attr.size == len(b"hello from the host\n")
    err, body = rig.lookup(b"missing")
    assert err == 0 and abi.ENTRY_OUT.unpack(body).nodeid == 0  # negative entry, cached 60 s
    assert abi.ENTRY_OUT.unpack(body).entry_valid == 60

    err, body = rig.fuse(abi.Opcode.OPEN, entry.nodeid, abi.OPEN_IN.pack(flags=os.O_RDONLY), abi.OPEN_OUT.size)
    assert err == 0
    fh = abi.OPEN_OUT.unpack(body).fh
    err, body = rig.fuse(abi.Opcode.READ, entry.nodeid, abi.READ_IN.pack(fh=fh, offset=6, size=100), 100)
    assert err == 0 and body == b"from the host\n"

    m = rig.server.metrics()
    assert m["ops"] == {"INIT": 1, "LOOKUP": 2, "OPEN": 1, "READ": 1}
    assert m["lookup_negative"] == 1 and m["lookup_positive"] == 1
    assert m["virtio"]["chains"] == 5 and m["virtio"]["interrupts"] >= 1
    assert m["vhost_user"]["call_signals"] == m["virtio"]["interrupts"]
    assert m["host_cpu"]["worker_threads_s"] > 0


def test_rings_in_a_second_region(rig_factory):
    rig = rig_factory(regions=((0, 1 * MiB), (64 * MiB, 8 * MiB)), ring_base=64 * MiB)
    rig.up()
    rig.init()
    assert rig.lookup(b"missing")[0] == errno.ENOENT


def test_get_vring_base_stops_and_restart_resumes(rig):
    rig.up()
    rig.init()
    rig.lookup(b"a")
    rig.lookup(b"b")
    assert rig.fe.get_vring_base(0) == 0
    assert rig.fe.get_vring_base(1) == 3  # the next available index: three requests were served
    assert fs_threads() == [] and rig.server.counters.device_stops == 1
    # The front-end starts the rings again where they stopped (QEMU's vhost_dev_start after a stop).
    old = rig.fe.kicks + rig.fe.calls
    rig.fe.kicks, rig.fe.calls = [], []
    for fd in old:
        os.close(fd)
    for i, q in enumerate(rig.queues):
        rig.fe.setup_ring(i, q, rig.guest, base=q.avail_idx)
    rig.sync()
    assert rig.server.counters.activations == 2
    rig.init()  # a device stop ends the FUSE session, as a virtio reset does
    assert rig.lookup(b"c")[0] == errno.ENOENT
    assert rig.queues[1].used_idx() == 5


def test_without_protocol_features_rings_start_enabled(rig):
    offered = rig.fe.u64(Request.GET_FEATURES)
    rig.up(features=offered & ~PROTOCOL_FEATURES_BIT, enable=False)
    assert rig.server.counters.activations == 1
    rig.init()


def test_rings_wait_for_enable(rig):
    rig.up(enable=False)
    assert rig.server.counters.activations == 0
    rig.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).encode())
    rig.sync()
    assert rig.server.counters.activations == 0
    rig.fe.send(Request.SET_VRING_ENABLE, VringState(1, 1).encode())
    rig.sync()
    assert rig.server.counters.activations == 1


def test_start_on_kick_with_unused_rings(rig):
    """A front-end that sets up only the request queue: the first kick starts the device."""
    rig.fe.negotiate()
    rig.fe.set_mem_table(rig.guest)
    rig.fe.setup_ring(1, rig.queues[1], rig.guest)
    rig.sync()
    assert rig.server.counters.activations == 0
    rig.init()  # publishes INIT and kicks ring 1
    rig.sync()  # the counter moves after activate() returns, possibly after the worker replied
    assert rig.server.counters.activations == 1
    assert rig.lookup(b"x")[0] == errno.ENOENT


def test_a_ring_enabled_after_a_kick_started_the_device_is_served(rig):
    """QEMU's order: every ring set up, then SET_VRING_ENABLE one ring at a time; a kick on
    ring 0 between the two enables starts the device with ring 0 only. Enabling ring 1 must add
    it (a CI run hung with QEMU 7.2 there: the guest's INIT on ring 1 was never served)."""
    rig.up(enable=False)
    rig.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).encode())
    rig.sync()
    assert rig.server.counters.activations == 0
    rig.fe.kick(0)                     # what starts the device with the ready rings: [0]
    deadline = time.monotonic() + WAIT_S
    while rig.server.counters.activations == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.server.counters.activations == 1
    rig.fe.send(Request.SET_VRING_ENABLE, VringState(1, 1).encode())
    rig.sync()
    assert rig.server.counters.activations == 2
    rig.init()
    assert rig.lookup(b"x")[0] == errno.ENOENT


def test_call_fd_replaced_while_running(rig):
    rig.up()
    rig.init()
    old = rig.fe.calls[1]
    new = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    rig.fe.send(Request.SET_VRING_CALL, VringFile(1, True).encode(), [new])
    rig.sync()
    rig.fe.calls[1] = new
    assert rig.lookup(b"x")[0] == errno.ENOENT  # waits on the new call fd
    with pytest.raises(BlockingIOError):
        os.eventfd_read(old)
    os.close(old)


def test_call_without_fd_means_no_interrupts(rig):
    rig.up()
    rig.init()
    rig.fe.send(Request.SET_VRING_CALL, VringFile(1, False).encode())
    rig.sync()
    q = rig.queues[1]
    q.add_chain([abi.IN_HEADER.pack(len=abi.IN_HEADER.size, opcode=abi.Opcode.STATFS, unique=99, nodeid=1,
                                    uid=0, gid=0, pid=1)], [abi.OUT_HEADER.size + abi.STATFS_OUT.size])
    rig.fe.kick(1)
    deadline = time.monotonic() + WAIT_S
    while q.used_idx() != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.used_idx() == 2
    with pytest.raises(BlockingIOError):
        os.eventfd_read(rig.fe.calls[1])


def test_new_memory_table_while_running_restarts(rig):
    rig.up()
    rig.init()
    assert rig.fe.set_mem_table(rig.guest) == 0
    assert rig.server.counters.activations == 2 and rig.server.counters.device_stops == 1
    rig.init()
    assert rig.lookup(b"x")[0] == errno.ENOENT


def test_corrupt_ring_signals_the_error_fd(rig):
    rig.up()
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    rig.fe.send(Request.SET_VRING_ERR, VringFile(1, True).encode(), [err])
    rig.sync()
    rig.init()
    q = rig.queues[1]
    rig.guest.write_u16(q.avail + 2, (q.avail_idx + QSIZE + 5) & 0xFFFF)  # avail idx jumps too far
    rig.fe.kick(1)
    r, _, _ = select.select([err], [], [], WAIT_S)
    assert r and os.eventfd_read(err) == 1
    assert rig.server.metrics()["virtio"]["broken_queues"] == 1
    os.close(err)


# -- REPLY_ACK ---------------------------------------------------------------------------------------
def test_need_reply_acks_success_and_failure(rig):
    fe = rig.fe
    assert fe.ack(Request.SET_OWNER) == 0
    assert fe.ack(Request.SET_VRING_NUM, VringState(0, 3).encode()) != 0      # not a power of two
    assert fe.ack(Request.SET_VRING_NUM, VringState(0, 2048).encode()) != 0   # above the maximum
    assert fe.ack(Request.SET_VRING_NUM, VringState(7, 16).encode()) != 0     # no ring 7
    assert fe.ack(Request.SET_VRING_NUM, VringState(0, 16).encode()) == 0
    assert fe.ack(99) != 0                                                    # unknown request
    assert fe.ack(Request.SET_LOG_BASE, encode_u64(0)) != 0                   # not supported
    rig.sync()
    assert rig.server.counters.refused == 5 and rig.server.counters.closed_by_backend == 0


# -- malformed messages close the connection; the back-end survives ------------------------------------
def _memtable_overlap(guest):
    t = guest.table()[0]
    half = MemoryRegion(t.guest_addr + 4096, 4096, t.user_addr + (1 << 30), 0)
    return encode_memory_table([t, half]), guest.fds() * 2


def _eventfd():
    return os.eventfd(0, os.EFD_CLOEXEC)


def _pipe_read_end():
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    return r


def _req(request: int, payload: bytes = b"", fds=lambda g: []):
    """A builder: guest -> (message bytes, fds to send)."""
    return lambda g: (encode_request(request, payload), fds(g))


def _raw(data: bytes):
    return lambda g: (data, [])


def _table(regions=lambda g: g.table(), fds=lambda g: g.fds()):
    return lambda g: (encode_request(Request.SET_MEM_TABLE, encode_memory_table(regions(g))), fds(g))


#: case -> (what the back-end must say when it closes the connection, message builder)
BAD_MESSAGES = {
    "unknown request": ("unknown request 99", _req(99)),
    "unsupported request": ("unsupported request SET_LOG_FD", _req(Request.SET_LOG_FD, fds=lambda g: [_eventfd()])),
    "short SET_FEATURES": ("payload is 4 bytes, expected 8", _req(Request.SET_FEATURES, b"\0" * 4)),
    "long GET_FEATURES": ("payload is 8 bytes, expected 0", _req(Request.GET_FEATURES, b"\0" * 8)),
    "unoffered feature": ("features 0x10000000000 were not offered", _req(Request.SET_FEATURES, encode_u64(1 << 40))),
    "unoffered protocol feature": ("protocol features 0x20 were not offered", _req(
        Request.SET_PROTOCOL_FEATURES, encode_u64(1 << ProtocolFeature.SLAVE_REQ))),
    "ring index out of range": ("vring index 2 out of range", _req(Request.SET_VRING_NUM, VringState(2, 16).encode())),
    "huge ring index": ("vring index 4294967295 out of range", _req(
        Request.SET_VRING_BASE, VringState(0xFFFFFFFF, 0).encode())),
    "GET_VRING_BASE out of range": ("vring index 5 out of range", _req(
        Request.GET_VRING_BASE, VringState(5, 0).encode())),
    "ring base above 16 bits": ("base 65536 is not a 16-bit", _req(
        Request.SET_VRING_BASE, VringState(0, 0x10000).encode())),
    "enable value 2": ("enable value 2", _req(Request.SET_VRING_ENABLE, VringState(0, 2).encode())),
    "ring logging": ("logging is not supported", _req(Request.SET_VRING_ADDR, VringAddr(0, 1, 0, 0, 0).encode())),
    "unknown ring flags": ("unknown flags 0x6", _req(Request.SET_VRING_ADDR, VringAddr(0, 6, 0, 0, 0).encode())),
    "fd on SET_OWNER": ("1 unexpected file descriptors", _req(Request.SET_OWNER, fds=lambda g: [_eventfd()])),
    "kick without fd": ("polling mode is not supported", _req(Request.SET_VRING_KICK, VringFile(0, False).encode())),
    "no-fd flag, fd sent": ("1 file descriptors, expected 0", _req(
        Request.SET_VRING_CALL, VringFile(0, False).encode(), lambda g: [_eventfd()])),
    "kick fd missing": ("0 file descriptors, expected 1", _req(Request.SET_VRING_KICK, VringFile(0, True).encode())),
    "kick is a memfd": ("is a file, not an eventfd", _req(
        Request.SET_VRING_KICK, VringFile(0, True).encode(), lambda g: [os.memfd_create("x", os.MFD_CLOEXEC)])),
    "call is a pipe": ("not an eventfd", _req(
        Request.SET_VRING_CALL, VringFile(0, True).encode(), lambda g: [_pipe_read_end()])),
    "two call fds": ("2 file descriptors, expected 1", _req(
        Request.SET_VRING_CALL, VringFile(0, True).encode(), lambda g: [_eventfd(), _eventfd()])),
    "vring fd reserved bits": ("reserved bits", _req(Request.SET_VRING_ERR, encode_u64(1 << 20))),
    "mem table without fds": ("1 regions but 0 file descriptors", _table(fds=lambda g: [])),
    "mem table fd count": ("1 regions but 2 file descriptors", _table(fds=lambda g: g.fds() * 2)),
    "mem table overlap": ("overlap in guest address space", lambda g: (
        encode_request(Request.SET_MEM_TABLE, _memtable_overlap(g)[0]), _memtable_overlap(g)[1])),
    "mem table region beyond the file": ("shorter than", _table(
        regions=lambda g: [MemoryRegion(0, 1 << 40, g.table()[0].user_addr, 0)])),
    "mem table eventfd": ("not a regular file", _table(fds=lambda g: [_eventfd()])),
    "mem table zero regions": ("0 regions", _req(Request.SET_MEM_TABLE, MEMORY_HEADER.pack(0, 0))),
    "nine fds": ("more than 8 file descriptors", _table(regions=lambda g: g.table() * 9, fds=lambda g: g.fds() * 9)),
    "set config": ("read-only", _req(Request.SET_CONFIG, ConfigSpace(0, 4, 0, b"evil").encode())),
    "protocol version 2": ("protocol version 2", _raw(HEADER.pack(Request.GET_FEATURES, 2, 0))),
    "reply flag on a request": ("reply flag set", _raw(HEADER.pack(Request.GET_FEATURES, 5, 0))),
    "payload size 1 GiB": ("payload of 1073741824 bytes exceeds", _raw(
        HEADER.pack(Request.SET_MEM_TABLE, 1, 1 << 30) + b"\0" * 64)),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_malformed_message_closes_the_connection(rig, case, caplog):
    baseline = open_fds()
    reason, build = BAD_MESSAGES[case]
    data, fds = build(rig.guest)
    ours = [fd for fd in fds if fd not in rig.guest.fds()]
    rig.fe.conn.send(data, fds)
    for fd in ours:
        os.close(fd)
    assert rig.fe.closed_by_peer(), case
    assert rig.ended()
    assert rig.server.counters.closed_by_backend == 1
    closing = [r.getMessage() for r in caplog.records if "closing the connection" in r.getMessage()]
    assert len(closing) == 1 and reason in closing[0], closing
    rig.fe.conn.close()
    # every descriptor the back-end received is closed again (ours were closed above)
    assert open_fds() <= baseline
    assert memfd_mappings() == 1  # the guest's own mapping only


def test_ring_outside_guest_memory(rig):
    rig.fe.negotiate()
    rig.fe.set_mem_table(rig.guest)
    assert rig.fe.ack(Request.SET_VRING_NUM, VringState(0, QSIZE).encode()) == 0
    top = rig.guest.user_addr(16 * MiB - 1) + 1
    for desc, avail, used in ((0x1000, top - 8192, top - 4096),           # desc table nowhere
                              (top - 16 * QSIZE, top - 8192, top - 4096),  # desc table ok, ...
                              (top - 8192 - 1024, top - 4096, top - 2)):   # used ring runs off the end
        if desc == top - 16 * QSIZE:
            avail = top - 2                                               # ... avail ring runs off
        assert rig.fe.ack(Request.SET_VRING_ADDR, VringAddr(0, 0, desc, used, avail).encode()) != 0
    rig.sync()


def test_misaligned_ring_refused_at_start(rig):
    rig.fe.negotiate()
    rig.fe.set_mem_table(rig.guest)
    q = rig.queues[1]
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    rig.fe.send(Request.SET_VRING_NUM, VringState(1, QSIZE).encode())
    rig.fe.send(Request.SET_VRING_ADDR, VringAddr(1, 0, rig.guest.user_addr(q.desc) + 8, rig.guest.user_addr(q.used),
                                                  rig.guest.user_addr(q.avail)).encode())
    rig.fe.send(Request.SET_VRING_CALL, VringFile(1, True).encode(), [call])
    rig.fe.send(Request.SET_VRING_ENABLE, VringState(1, 1).encode())
    assert rig.fe.ack(Request.SET_VRING_KICK, VringFile(1, True).encode(), [kick]) == 0  # not started yet
    os.eventfd_write(kick, 1)  # start on kick: the descriptor table is not 16-byte aligned
    assert rig.fe.closed_by_peer()
    assert rig.ended()
    assert rig.server.counters.activations == 0
    os.close(kick)
    os.close(call)


def test_half_a_message_then_eof(rig):
    rig.fe.conn.sock.sendall(encode_request(Request.SET_FEATURES, encode_u64(0))[:15])
    rig.fe.conn.sock.shutdown(socket.SHUT_WR)
    assert rig.ended()
    assert rig.server.counters.closed_by_backend == 0  # the front-end left; nothing was refused


def test_stalled_message_times_out(share):
    device = FsDevice(FsOptions(source=str(share), tag="share"))
    server = BackendServer(device, None, timeout=0.5)
    a, b = socket.socketpair()
    t = serve_in_thread(server, b)
    a.sendall(encode_request(Request.SET_FEATURES, encode_u64(0))[:14])
    t.join(WAIT_S)
    assert not t.is_alive() and server.counters.closed_by_backend == 1
    a.close()
    device.close()
    server.close()


# -- the front-end going away ----------------------------------------------------------------------
def test_frontend_disconnect_releases_everything(rig):
    baseline = open_fds()
    rig.up()
    rig.init()
    assert memfd_mappings() == 2 and fs_threads()
    rig.fe.close()  # no GET_VRING_BASE: the front-end just dies
    assert rig.ended()
    assert fs_threads() == []
    assert memfd_mappings() == 1
    # our kick/call eventfds were closed by fe.close(); the back-end's copies must be gone too
    assert open_fds() <= baseline


def test_listening_server_serves_one_frontend_after_another(share, tmp_path):
    path = str(tmp_path / "fs.sock")
    device = FsDevice(FsOptions(source=str(share), tag="share"))
    server = BackendServer(device, path, timeout=WAIT_S)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        for round_ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            if round_ == 1:  # a broken front-end in between
                sock.sendall(HEADER.pack(12345, 1, 0))
                fe = Frontend(sock)
                assert fe.closed_by_peer()
                fe.close()
                continue
            rig = _ConnectedRig(sock, share)
            rig.up()
            rig.init()
            assert rig.lookup(b"hello.txt")[0] == 0
            rig.fe.close()
            rig.guest.close()
        deadline = time.monotonic() + WAIT_S
        while server.counters.connections < 3 or server.backend is not None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert server.counters.activations == 2 and server.counters.closed_by_backend == 1
        assert device.metrics()["ops"]["INIT"] == 2
    finally:
        server.request_stop()
        t.join(WAIT_S)
        assert not t.is_alive()
        server.close()
        device.close()
    assert not os.path.exists(path)


class _ConnectedRig(Rig):
    """A Rig whose back-end is the listening server (only the front-end half is built here)."""

    def __init__(self, sock, share) -> None:
        self.fe = Frontend(sock)
        self.guest = MemfdGuest([(0, 16 * MiB)])
        self.queues = [FakeDriverQueue(self.guest, QSIZE, 0x10000 * (i + 1), MiB * (i + 1)) for i in range(2)]
        self.unique = 0


def test_once_serves_a_single_frontend(share, tmp_path):
    path = str(tmp_path / "fs.sock")
    device = FsDevice(FsOptions(source=str(share), tag="share"))
    server = BackendServer(device, path, once=True)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    fe = Frontend(sock)
    assert decode_u64(fe.call(Request.GET_FEATURES).payload) & VERSION_1
    fe.close()
    t.join(WAIT_S)
    assert not t.is_alive()
    server.close()
    device.close()


def test_socket_path_checks(share, tmp_path):
    device = FsDevice(FsOptions(source=str(share), tag="share"))
    path = str(tmp_path / "fs.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on: replaced
    with BackendServer(device, path) as server:
        with pytest.raises(SocketInUse, match="in use"):
            BackendServer(device, path)
        assert server.listener is not None
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(SocketInUse, match="not a socket"):
        BackendServer(device, str(regular))
    assert regular.read_text() == "keep me"
    device.close()


def test_stop_while_waiting_in_a_session(rig):
    rig.up()
    rig.server.request_stop()
    assert rig.ended()
    assert fs_threads() == []
