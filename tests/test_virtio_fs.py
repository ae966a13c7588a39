"""virtio-fs device end to end without a VM.

A fake driver lays out the rings in fake guest memory and talks to the real MmioTransport exactly as
Linux does (feature negotiation, queue setup, QueueNotify); the real worker thread serves the queues
with the real FUSE Server over a PassthroughFs on a temporary directory. Replies are read back from
"guest memory", and interrupts arrive on a real eventfd.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading

import pytest

from devices.memory import GuestMemory
from devices.virtio.device import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from devices.virtio.fs.device import FsDevice, config_space
from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from devices.virtio.fs.worker import FsWorker, WorkerCounters
from devices.virtio.interrupt import Interrupt
from devices.virtio.mmio import MmioTransport
from devices.virtio.queue import VRING_DESC_F_NEXT, Queue
from fuse import abi
from fuse.server import Server
from tests.fakes import FakeDriverQueue, MmioDriver

MEM = 16 << 20
WAIT_S = 30  # a bound on waiting for the worker, not a timing assertion
QSIZE = 64


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _fs_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("virtio-fs:")]


class Guest:
    """The guest side: fake virtio-fs driver over the transport, speaking FUSE on the queues."""

    def __init__(self, options: FsOptions, fs_factory=None) -> None:
        self.mem = GuestMemory.from_ranges([(0, MEM)])
        self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dev = FsDevice(options, fs_factory)
        self.t = MmioTransport(self.dev, self.mem, self.irq)
        self.mmio = MmioDriver(self.t)
        n = len(self.dev.queue_max_sizes)
        self.queues = [FakeDriverQueue(self.mem, QSIZE, 0x10000 * (i + 1), (1 << 20) * (i + 1))
                       for i in range(n)]
        self.unique = 0
        self.irqs = 0

    def up(self) -> int:
        return self.mmio.bring_up(queues=self.queues)

    def close(self) -> None:
        self.t.close()
        os.close(self.irq)

    def kick(self, qi: int) -> None:
        self.mmio.w(0x50, qi)  # the MMIO-exit path; KVM's ioeventfd would write the same eventfd

    def wait_used(self, qi: int, n: int) -> None:
        """Wait for used idx n on queue qi, counting interrupts (the driver ACKs like Linux)."""
        q = self.queues[qi]
        while q.used_idx() != n:
            r, _, _ = select.select([self.irq], [], [], WAIT_S)
            assert r, f"no interrupt within {WAIT_S}s (used idx {q.used_idx()}, want {n})"
            self.irqs += os.eventfd_read(self.irq)
            status = self.mmio.r(0x60)
            self.mmio.w(0x64, status)

    def submit(self, qi: int, readable: list[bytes], writable: list[int], *, indirect=False):
        """Publish a chain, kick, wait for it; returns (used len, reply bytes)."""
        q = self.queues[qi]
        want = (q.used_idx() + 1) & 0xFFFF
        q.set_used_event(q.used_idx())  # Linux's virtqueue_enable_cb: interrupt on the next one
        head, outs = q.add_chain(readable, writable, indirect=indirect)
        self.kick(qi)
        self.wait_used(qi, want)
        used_id, used_len = q.used_elems()[-1]
        assert used_id == head
        data = b"".join(self.mem.read(a, n) for a, n in zip(outs, writable))
        return used_len, data[:used_len]

    def fuse(self, opcode: int, nodeid: int, args: bytes, out_size: int, *, payload=(),
             out_split=None, indirect=False, qi: int = 1):
        """One FUSE request; returns (error, reply body). The in-header goes in its own descriptor,
        like Linux's virtio_fs, and out buffers may be split (header | pages)."""
        self.unique += 1
        body = args + b"".join(payload)
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(body), opcode=opcode,
                                 unique=self.unique, nodeid=nodeid, uid=os.getuid(),
                                 gid=os.getgid(), pid=1)
        readable = [hdr] + ([args] if args else []) + list(payload)
        writable = out_split or [abi.OUT_HEADER.size + out_size]
        used, reply = self.submit(qi, readable, writable, indirect=indirect)
        out = abi.OUT_HEADER.unpack(reply[:abi.OUT_HEADER.size])
        assert out.unique == self.unique and out.len == used
        return -out.error, reply[abi.OUT_HEADER.size:]

    def init(self) -> abi.INIT_OUT:
        err, body = self.fuse(abi.Opcode.INIT, 0, abi.INIT_IN.pack(
            major=7, minor=37, max_readahead=1 << 17,
            flags=abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES | abi.FUSE_DO_READDIRPLUS), abi.INIT_OUT.size)
        assert err == 0
        return abi.INIT_OUT.unpack(body)


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def guest(share):
    g = Guest(FsOptions(source=str(share), tag="myfs"))
    yield g
    g.close()


def test_config_space_and_queues(share):
    dev = FsDevice(FsOptions(source=str(share), tag="myfs", num_request_queues=2))
    try:
        assert dev.device_type == 26
        assert dev.queue_max_sizes == [1024, 1024, 1024]
        assert dev.config == b"myfs" + b"\0" * 32 + struct.pack("<I", 2)
        assert dev.read_config(36, 4) == struct.pack("<I", 2)
        assert dev.read_config(0, 2) == b"my"
        with pytest.raises(PermissionError):
            dev.write_config(0, b"x")
    finally:
        dev.close()
    assert config_space("t" * 36, 1)[:36] == b"t" * 36  # full tag: no terminator


def test_config_space_through_mmio(guest):
    assert guest.mmio.r(0x08) == 26
    assert guest.t.read(0x100, 4) == b"myfs"
    assert guest.t.read(0x100 + 36, 4) == struct.pack("<I", 1)
    assert guest.t.read(0x100 + 4, 1) == b"\0"


def test_end_to_end_init_lookup_create_write_read(guest, share):
    assert guest.up() & VIRTIO_CONFIG_S_DRIVER_OK
    assert [t.name for t in _fs_threads()] == ["virtio-fs:myfs"]

    init = guest.init()
    assert (init.major, init.minor) == (7, 37)

    err, _ = guest.fuse(abi.Opcode.LOOKUP, 1, b"hello.txt\0", abi.ENTRY_OUT.size)
    assert err == errno.ENOENT

    create = abi.CREATE_IN.pack(flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0o022)
    err, body = guest.fuse(abi.Opcode.CREATE, 1, create + b"hello.txt\0",
                           abi.ENTRY_OUT.size + abi.OPEN_OUT.size)
    assert err == 0
    entry = abi.ENTRY_OUT.unpack(body)
    fh = abi.OPEN_OUT.unpack(body, abi.ENTRY_OUT.size).fh
    assert entry.nodeid > 1 and entry.attr.mode & 0o777 == 0o644
    assert (share / "hello.txt").exists()

    data = os.urandom(3 * 4096 + 100)
    pages = [data[i:i + 4096] for i in range(0, len(data), 4096)]  # one descriptor per page
    wr = abi.WRITE_IN.pack(fh=fh, offset=0, size=len(data))
    err, body = guest.fuse(abi.Opcode.WRITE, entry.nodeid, wr, abi.WRITE_OUT.size, payload=pages)
    assert err == 0 and abi.WRITE_OUT.unpack(body).size == len(data)
    assert (share / "hello.txt").read_bytes() == data

    rd = abi.READ_IN.pack(fh=fh, offset=0, size=len(data))
    err, body = guest.fuse(abi.Opcode.READ, entry.nodeid, rd, 0, indirect=True,
                           out_split=[abi.OUT_HEADER.size] + [4096] * 4)
    assert err == 0 and body == data

    err, body = guest.fuse(abi.Opcode.LOOKUP, 1, b"hello.txt\0", abi.ENTRY_OUT.size)
    assert err == 0 and abi.ENTRY_OUT.unpack(body).nodeid == entry.nodeid

    # hiprio FORGET: out-only chain, still returned on the used ring with 0 bytes
    hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + abi.FORGET_IN.size, opcode=abi.Opcode.FORGET,
                             unique=999, nodeid=entry.nodeid)
    used, _ = guest.submit(0, [hdr, abi.FORGET_IN.pack(nlookup=2)], [])
    assert used == 0
    assert guest.queues[0].used_elems()[-1][1] == 0

    assert guest.irqs >= 1
    m = guest.dev.metrics()
    assert m["ops"]["WRITE"] == 1 and m["ops"]["READ"] == 1 and m["ops"]["FORGET"] == 1
    assert m["lookup_positive"] == 1 and m["lookup_error"] == 1
    assert m["virtio"]["chains"] == 7 and m["virtio"]["invalid_chains"] == 0
    assert m["virtio"]["interrupts"] >= 1


def test_malformed_chain_returned_and_worker_survives(guest):
    guest.up()
    guest.init()
    q = guest.queues[1]
    before = q.used_idx()
    buf = q.alloc(64)
    q.next_desc = 40
    q.add_raw({30: (buf, 8, VRING_DESC_F_NEXT, 31), 31: (buf, 8, VRING_DESC_F_NEXT, 30)}, 30)  # loop
    q.add_raw({32: (MEM + 4096, 8, 0, 0)}, 32)  # outside guest memory
    q.set_used_event(before)
    guest.kick(1)
    guest.wait_used(1, before + 2)
    assert q.used_elems()[-2:] == [(30, 0), (32, 0)]
    # a request with no readable header at all: the server drops it, the chain still comes back
    used, _ = guest.submit(1, [], [64])
    assert used == 0
    err, _ = guest.fuse(abi.Opcode.LOOKUP, 1, b"nothing\0", abi.ENTRY_OUT.size)
    assert err == errno.ENOENT
    assert guest.dev.metrics()["virtio"]["invalid_chains"] == 2
    assert guest.dev.worker_thread.is_alive()


class ExplodingFs(PassthroughFs):
    """A real filesystem whose lookup has a bug (raises a non-OSError)."""

    def lookup(self, ctx, parent, name):
        if name == b"boom":
            raise RuntimeError("bug")
        return super().lookup(ctx, parent, name)


def test_filesystem_bug_becomes_eio_and_worker_goes_on(share):
    g = Guest(FsOptions(source=str(share), tag="boom"), ExplodingFs)
    try:
        g.up()
        g.init()
        err, _ = g.fuse(abi.Opcode.LOOKUP, 1, b"boom\0", abi.ENTRY_OUT.size)
        assert err == errno.EIO
        err, _ = g.fuse(abi.Opcode.LOOKUP, 1, b"fine\0", abi.ENTRY_OUT.size)
        assert err == errno.ENOENT
    finally:
        g.close()


def _drain_irq(irq: int) -> int:
    try:
        return os.eventfd_read(irq)
    except BlockingIOError:
        return 0


def test_event_idx_suppresses_interrupt(guest):
    guest.up()
    guest.init()
    q = guest.queues[1]
    start = q.used_idx()
    # the driver asks for an interrupt only once used entry start+1 is published (2 completions)
    q.set_used_event((start + 1) & 0xFFFF)
    _drain_irq(guest.irq)
    hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + 4, opcode=abi.Opcode.LOOKUP, unique=77, nodeid=1)
    q.add_chain([hdr, b"aaa\0"], [256])
    guest.kick(1)
    for _ in range(WAIT_S * 100):  # watch the used ring: no interrupt is expected for this one
        if q.used_idx() == start + 1:
            break
        select.select([], [], [], 0.01)
    assert q.used_idx() == start + 1
    assert _drain_irq(guest.irq) == 0
    q.add_chain([hdr, b"bbb\0"], [256])
    guest.kick(1)
    assert select.select([guest.irq], [], [], WAIT_S)[0]  # this one crosses used_event
    assert q.used_idx() == start + 2


def test_reset_joins_worker_and_leaks_no_fds(share):
    before_all = _fds()
    g = Guest(FsOptions(source=str(share), tag="reset"))
    before = _fds()
    g.up()
    g.init()
    create = abi.CREATE_IN.pack(flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0)
    err, _ = g.fuse(abi.Opcode.CREATE, 1, create + b"f\0", abi.ENTRY_OUT.size + abi.OPEN_OUT.size)
    assert err == 0
    thread = g.dev.worker_thread
    assert thread.is_alive() and len(_fs_threads()) == 1
    g.mmio.w(0x70, 0)  # driver reset
    assert not thread.is_alive() and _fs_threads() == []
    assert g.dev.worker_thread is None
    assert _fds() <= before  # worker epoll + stop eventfd + every fs fd (open file, root) closed
    g.dev.reset()  # idempotent
    # the device comes back after a reset, with a fresh FUSE session
    for q in g.queues:
        q.reset()
    assert g.up() & VIRTIO_CONFIG_S_DRIVER_OK
    g.init()
    err, _ = g.fuse(abi.Opcode.LOOKUP, 1, b"f\0", abi.ENTRY_OUT.size)
    assert err == 0
    g.close()
    assert _fs_threads() == []
    assert _fds() <= before_all


def test_two_request_queues_served_by_one_worker(share):
    g = Guest(FsOptions(source=str(share), tag="mq", num_request_queues=2))
    try:
        g.up()
        g.init()
        assert len(_fs_threads()) == 1
        err, _ = g.fuse(abi.Opcode.LOOKUP, 1, b"x\0", abi.ENTRY_OUT.size, qi=2)
        assert err == errno.ENOENT
    finally:
        g.close()


def test_broken_ring_sets_needs_reset(guest):
    guest.up()
    q = guest.queues[1]
    guest.mem.write_u16(q.avail + 2, QSIZE + 5)  # available index jumps past the ring
    guest.kick(1)
    r, _, _ = select.select([guest.irq], [], [], WAIT_S)
    assert r
    assert guest.mmio.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert guest.mmio.r(0x60) & 2  # configuration change interrupt
    assert guest.dev.metrics()["virtio"]["broken_queues"] == 1


class RaisingServer(Server):
    """A real Server that fails on one request (Server.handle itself never raises; this is the
    worker's last line of defence against a bug there)."""

    def handle(self, reader, writer, queue=0, **kw):
        if reader.remaining() == 5:
            raise RuntimeError("server bug")
        return super().handle(reader, writer, queue, **kw)


def test_worker_survives_a_raising_server(share):
    mem = GuestMemory.from_ranges([(0, MEM)])
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    evt = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    drv = FakeDriverQueue(mem, 16, 0x1000, 0x100000)
    q = Queue(mem, 16, drv.desc, drv.avail, drv.used, True, indirect=True)
    fs = PassthroughFs(FsOptions(source=str(share), tag="w"))
    counters = WorkerCounters()
    worker = FsWorker("virtio-fs:w", RaisingServer(fs), Interrupt(irq), [q], [evt], counters)
    try:
        worker.start()
        h1, _ = drv.add_chain([b"12345"], [64])
        h2, _ = drv.add_chain([b"123"], [64])  # too short for a header: the server drops it
        os.eventfd_write(evt, 1)
        while drv.used_idx() != 2:
            assert select.select([irq], [], [], WAIT_S)[0]
            os.eventfd_read(irq)
        assert drv.used_elems() == [(h1, 0), (h2, 0)]
        assert counters.handler_errors == 1 and counters.chains == 2
        assert worker.thread.is_alive()
    finally:
        worker.stop()
        fs.destroy()
        os.close(irq)
        os.close(evt)
    assert not worker.thread.is_alive()


class _BlockingGetattrFs(PassthroughFs):
    """GETATTR blocks until released: a host file system call that does not return."""

    def __init__(self, options: FsOptions) -> None:
        super().__init__(options)
        self.entered = threading.Event()
        self.release = threading.Event()

    def getattr(self, ctx, nodeid, fh):
        self.entered.set()
        self.release.wait()
        return super().getattr(ctx, nodeid, fh)


def test_a_stuck_request_cannot_hang_the_vcpu_that_resets_the_device(share, caplog):
    made: list[_BlockingGetattrFs] = []

    def factory(options):
        made.append(_BlockingGetattrFs(options))
        return made[0]

    g = Guest(FsOptions(source=str(share), tag="myfs"), factory)
    g.dev.stop_timeout = 0.2
    try:
        assert g.up() & VIRTIO_CONFIG_S_DRIVER_OK
        g.init()
        fs = made[0]
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + abi.GETATTR_IN.size,
                                 opcode=abi.Opcode.GETATTR, unique=4242, nodeid=1)
        g.queues[1].add_chain([hdr, abi.GETATTR_IN.pack()],
                              [abi.OUT_HEADER.size + abi.ATTR_OUT.size])
        g.kick(1)
        assert fs.entered.wait(WAIT_S), "GETATTR never reached the file system"
        used_before = g.queues[1].used_idx()

        # A vCPU writes Status=0 while the worker is stuck in GETATTR: it must come back.
        vcpu = threading.Thread(target=g.mmio.w, args=(0x70, 0), name="vcpu0")
        vcpu.start()
        vcpu.join(WAIT_S)
        assert not vcpu.is_alive(), "the device reset waited for the stuck request forever"
        assert g.mmio.r(0x70) == 0
        assert "stuck in GETATTR unique=4242 on queue 1" in caplog.text

        # While the call is still stuck the device cannot start again: DEVICE_NEEDS_RESET.
        status = g.up()
        assert status & VIRTIO_CONFIG_S_NEEDS_RESET
        assert "still stuck in GETATTR" in caplog.text

        # Once the host call returns, the old worker ends without touching the old rings, and
        # the next reset brings the device back.
        fs.release.set()
        for t in _fs_threads():
            t.join(WAIT_S)
        assert not _fs_threads()
        assert g.queues[1].used_idx() == used_before
        for q in g.queues:
            q.reset()
        assert g.up() & VIRTIO_CONFIG_S_DRIVER_OK
        assert not g.mmio.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET
        g.init()
        err, body = g.fuse(abi.Opcode.GETATTR, 1, abi.GETATTR_IN.pack(), abi.ATTR_OUT.size)
        assert err == 0 and abi.ATTR_OUT.unpack(body).attr.ino == os.stat(share).st_ino
    finally:
        made[0].release.set()
        g.close()


class _BlockingFsyncFs(PassthroughFs):
    """FSYNC blocks until released: a write-back of a big dirty file on a slow disk."""

    def __init__(self, options: FsOptions) -> None:
        super().__init__(options)
        self.entered = threading.Event()
        self.release = threading.Event()

    def fsync(self, ctx, nodeid, fh, datasync):
        self.entered.set()
        self.release.wait()
        return super().fsync(ctx, nodeid, fh, datasync)


def _blocking_fsync_guest(share, made):
    def factory(options):
        made.append(_BlockingFsyncFs(options))
        return made[0]

    g = Guest(FsOptions(source=str(share), tag="myfs"), factory)
    assert g.up() & VIRTIO_CONFIG_S_DRIVER_OK
    g.init()
    create = abi.CREATE_IN.pack(flags=os.O_RDWR | os.O_CREAT, mode=0o100644, umask=0o022)
    err, body = g.fuse(abi.Opcode.CREATE, 1, create + b"big\0", abi.ENTRY_OUT.size + abi.OPEN_OUT.size)
    assert err == 0
    nodeid = abi.ENTRY_OUT.unpack(body).nodeid
    fh = abi.OPEN_OUT.unpack(body, abi.ENTRY_OUT.size).fh
    hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + abi.FSYNC_IN.size, opcode=abi.Opcode.FSYNC,
                             unique=7777, nodeid=nodeid)
    head, _ = g.queues[1].add_chain([hdr, abi.FSYNC_IN.pack(fh=fh)], [abi.OUT_HEADER.size])
    g.kick(1)
    assert made[0].entered.wait(WAIT_S), "FSYNC never reached the file system"
    return g, head


def test_a_slow_fsync_does_not_hold_up_the_lookups_behind_it(share):
    """Several requests in flight (issue 9 item 4): while an FSYNC waits on the disk, LOOKUPs
    queued after it on the same queue are answered."""
    made: list[_BlockingFsyncFs] = []
    g, fsync_head = _blocking_fsync_guest(share, made)
    try:
        (share / "there").write_bytes(b"x")
        err, body = g.fuse(abi.Opcode.LOOKUP, 1, b"there\0", abi.ENTRY_OUT.size)
        assert err == 0 and abi.ENTRY_OUT.unpack(body).nodeid > 1
        err, _ = g.fuse(abi.Opcode.LOOKUP, 1, b"missing\0", abi.ENTRY_OUT.size)
        assert err == errno.ENOENT
        assert fsync_head not in [h for h, _ in g.queues[1].used_elems()]  # still in progress

        made[0].release.set()
        used = g.queues[1].used_idx()
        deadline = threading.Event()
        for _ in range(int(WAIT_S / 0.01)):
            if fsync_head in [h for h, _ in g.queues[1].used_elems()]:
                break
            deadline.wait(0.01)
        assert (fsync_head, abi.OUT_HEADER.size) in g.queues[1].used_elems()
        assert g.queues[1].used_idx() == (used + 1) & 0xFFFF
        assert g.dev.metrics()["virtio"]["pooled"] == 1
    finally:
        made[0].release.set()
        g.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("virtio-fs")]


def test_a_stuck_pooled_request_is_reported_and_its_thread_ends(share, caplog):
    made: list[_BlockingFsyncFs] = []
    g, fsync_head = _blocking_fsync_guest(share, made)
    g.dev.stop_timeout = 0.2
    try:
        used_before = g.queues[1].used_idx()
        g.mmio.w(0x70, 0)  # the driver resets the device while FSYNC is stuck
        assert "stuck in FSYNC unique=7777 on queue 1" in caplog.text
        made[0].release.set()
        for t in [t for t in threading.enumerate() if t.name.startswith("virtio-fs")]:
            t.join(WAIT_S)
        assert not [t for t in threading.enumerate() if t.name.startswith("virtio-fs")]
        assert g.queues[1].used_idx() == used_before  # the old rings were not touched
    finally:
        made[0].release.set()
        g.close()


def test_which_requests_go_to_the_blocking_pool():
    from devices.virtio.fs.worker import BLOCKING_IO_SIZE, blocking_request
    from devices.virtio.queue import DescriptorChain

    def chain(opcode, arg=b"", split=True):
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(arg), opcode=opcode, unique=1, nodeid=2)
        parts = [hdr, arg] if split else [hdr + arg]
        return DescriptorChain(0, [memoryview(bytearray(p)) for p in parts if p])

    for split in (True, False):
        assert blocking_request(chain(abi.Opcode.FSYNC, abi.FSYNC_IN.pack(fh=1), split))
        assert blocking_request(chain(abi.Opcode.READ, abi.READ_IN.pack(size=BLOCKING_IO_SIZE), split))
        assert blocking_request(chain(abi.Opcode.WRITE, abi.WRITE_IN.pack(size=1 << 20), split))
        assert not blocking_request(chain(abi.Opcode.READ, abi.READ_IN.pack(size=128 << 10), split))
        assert not blocking_request(chain(abi.Opcode.LOOKUP, b"name\0", split))
    assert not blocking_request(chain(abi.Opcode.READ))  # no read_in: the server rejects it inline
    assert not blocking_request(DescriptorChain(0, [memoryview(b"\0" * 4)]))
    assert not blocking_request(DescriptorChain(0))


def test_a_large_read_is_served_by_the_pool(guest, share):
    """A 1 MiB READ goes to the blocking pool (issue 9 item 4) and still returns the file's data."""
    data = os.urandom(1 << 20)
    (share / "big").write_bytes(data)
    assert guest.up() & VIRTIO_CONFIG_S_DRIVER_OK
    guest.init()
    err, body = guest.fuse(abi.Opcode.LOOKUP, 1, b"big\0", abi.ENTRY_OUT.size)
    assert err == 0
    nodeid = abi.ENTRY_OUT.unpack(body).nodeid
    err, body = guest.fuse(abi.Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags=os.O_RDONLY), abi.OPEN_OUT.size)
    assert err == 0
    fh = abi.OPEN_OUT.unpack(body).fh
    for _ in range(2):
        rd = abi.READ_IN.pack(fh=fh, offset=0, size=len(data))
        err, body = guest.fuse(abi.Opcode.READ, nodeid, rd, 0, indirect=True,
                               out_split=[abi.OUT_HEADER.size] + [4096] * 256)
        assert err == 0 and body == data
    assert guest.dev.metrics()["virtio"]["pooled"] == 2
