"""Our vhost-user front-end driving our back-end: both real, in one process, no KVM needed.

The front-end (`VhostUserFsFrontend` behind the real `MmioTransport`) gets guest RAM from
`map_memfd` and a fake guest driver (tests.fakes.MmioDriver, FakeDriverQueue) that does what
Linux's virtio_mmio.c does through the registers. The back-end is the real `BackendServer` with a
real `FsDevice` over a temporary directory, listening on a real Unix socket in a thread. What KVM
would do is done by hand: a kick is a write to the transport's queue eventfd (the ioeventfd), and
an interrupt is the back-end's write to the transport's irqfd, which the test reads.
"""

from __future__ import annotations

import os
import select
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from devices.memory import GuestMemory, map_memfd
from devices.virtio.device import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET
from devices.virtio.fs.device import FsDevice
from devices.virtio.fs.options import FsOptions
from devices.virtio.interrupt import VIRTIO_MMIO_INT_VRING
from devices.virtio.mmio import VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_STATUS, MmioTransport
from devices.virtio.vhost_user.frontend import (
    VhostUserFrontendError,
    VhostUserFsFrontend,
    VhostUserFsOptions,
)
from devices.virtio.vhost_user.server import BackendServer
from fuse import abi
from tests.fakes import FakeDriverQueue, MmioDriver

MiB = 1 << 20
WAIT_S = 30  # bounds a wait, never a timing assertion


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="pyvmm-fe-"))  # short: a socket path has at most 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_bytes(b"hello\n")
    return d


class Backend:
    """BackendServer.serve() on a listening socket, in a thread."""

    def __init__(self, share: Path, sockdir: Path, tag: str = "share", **options) -> None:
        self.device = FsDevice(FsOptions(source=str(share), tag=tag, **options))
        self.path = str(sockdir / "fs.sock")
        self.server = BackendServer(self.device, self.path, timeout=WAIT_S)
        self.thread = threading.Thread(target=self.server.serve, name="backend", daemon=True)
        self.thread.start()

    def stats(self) -> dict:
        return self.server.metrics()

    def wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    def close(self) -> None:
        self.server.request_stop()
        self.thread.join(WAIT_S)
        self.server.close()
        self.device.close()


class Vm:
    """What the VMM assembles for one vhost-user-fs device, and a driver for its registers."""

    def __init__(self, socket_path: str, tag: str = "share", *, on_lost=None, **kw) -> None:
        self.memory = GuestMemory.from_ranges([(0, 16 * MiB)], backing=map_memfd)
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.device = VhostUserFsFrontend(VhostUserFsOptions(socket_path, tag, **kw), self.memory,
                                              on_lost=on_lost, timeout=WAIT_S)
        except BaseException:
            self.memory.close()
            os.close(self.irq_fd)
            raise
        self.transport = MmioTransport(self.device, self.memory, self.irq_fd)
        self.driver = MmioDriver(self.transport)
        self.queues = [FakeDriverQueue(self.memory, 64, 0x10000 * (i + 1), MiB * (i + 1)) for i in range(2)]
        self.unique = 0

    def up(self) -> int:
        return self.driver.bring_up(queues=self.queues)

    def fuse(self, opcode: int, nodeid: int, args: bytes, out_size: int) -> tuple[int, bytes]:
        """One request on queue 1: kick as KVM would, wait for the interrupt the back-end raises."""
        q = self.queues[1]
        self.unique += 1
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(args), opcode=opcode, unique=self.unique,
                                 nodeid=nodeid, uid=0, gid=0, pid=1)
        want = (q.used_idx() + 1) & 0xFFFF
        q.set_used_event(q.used_idx())
        head, outs = q.add_chain([hdr] + ([args] if args else []), [abi.OUT_HEADER.size + out_size])
        os.eventfd_write(self.transport.queue_events[1], 1)   # the guest's QueueNotify
        deadline = time.monotonic() + WAIT_S
        while q.used_idx() != want:
            ready, _, _ = select.select([self.irq_fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready or time.monotonic() < deadline, "no interrupt from the back-end"
            if ready:
                os.eventfd_read(self.irq_fd)
        used_id, used_len = q.used_elems()[-1]
        assert used_id == head
        reply = self.memory.read(outs[0], used_len)
        out = abi.OUT_HEADER.unpack(reply[:abi.OUT_HEADER.size])
        assert out.unique == self.unique
        return -out.error, reply[abi.OUT_HEADER.size:]

    def close(self) -> None:
        self.transport.close()
        self.memory.close()
        os.close(self.irq_fd)


def test_requests_go_from_the_kick_fd_to_the_backend_and_back_through_the_irqfd(share, sockdir):
    be = Backend(share, sockdir)
    vm = Vm(be.path)
    try:
        status = vm.up()
        assert status & VIRTIO_CONFIG_S_DRIVER_OK and not status & VIRTIO_CONFIG_S_NEEDS_RESET
        be.wait(lambda: be.stats()["vhost_user"]["active"], "the back-end never started the rings")
        err, _ = vm.fuse(abi.Opcode.INIT, 0, abi.INIT_IN.pack(major=7, minor=31, max_readahead=1 << 17,
                                                              flags=0), abi.INIT_OUT.size)
        assert err == 0
        err, body = vm.fuse(abi.Opcode.LOOKUP, 1, b"hello.txt\0", abi.ENTRY_OUT.size)
        assert err == 0 and abi.ENTRY_OUT.unpack(body).attr.size == 6
        err, _ = vm.fuse(abi.Opcode.LOOKUP, 1, b"missing\0", abi.ENTRY_OUT.size)
        assert err == 2
        stats = be.stats()
        assert stats["ops"]["INIT"] == 1 and stats["ops"]["LOOKUP"] == 2
        assert stats["vhost_user"]["refused"] == 0 and stats["vhost_user"]["call_signals"] >= 3
        # The VMM's transport never saw those interrupts, yet the guest's handler must walk the
        # rings: InterruptStatus reports VRING while the back-end owns them.
        assert vm.driver.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING
        assert vm.transport.interrupt.signals == 0
        fe = vm.device.metrics()["vhost_user_frontend"]
        assert fe["activations"] == 1 and fe["lost"] is None
        # Device reset by the driver: GET_VRING_BASE stops the back-end's rings.
        vm.driver.w(VIRTIO_MMIO_STATUS, 0)
        assert not be.stats()["vhost_user"]["active"]
        assert vm.driver.r(VIRTIO_MMIO_INTERRUPT_STATUS) == 0
        # ... and the driver can start it again.
        for q in vm.queues:
            q.reset()
        assert vm.up() & VIRTIO_CONFIG_S_DRIVER_OK
        be.wait(lambda: be.stats()["vhost_user"]["activations"] == 2, "no second start")
    finally:
        vm.close()
    # The VM went away: the back-end session ended and it waits for the next front-end.
    be.wait(lambda: be.server.backend is None, "the back-end kept the session")
    assert be.thread.is_alive()
    vm2 = Vm(be.path)
    try:
        assert vm2.up() & VIRTIO_CONFIG_S_DRIVER_OK
        be.wait(lambda: be.stats()["vhost_user"]["connections"] == 2, "no second connection")
    finally:
        vm2.close()
        be.close()


def test_missing_backend_is_one_line_naming_the_socket(sockdir):
    path = str(sockdir / "nobody.sock")
    with pytest.raises(VhostUserFrontendError) as e:
        Vm(path)
    assert str(e.value) == f"vhost-user-fs back-end {path}: cannot connect: No such file or directory"


def test_wrong_tag_or_too_few_queues_is_refused_at_connect(share, sockdir):
    be = Backend(share, sockdir, tag="share")
    try:
        with pytest.raises(VhostUserFrontendError, match="serves tag 'share', the VM config says 'data'"):
            Vm(be.path, tag="data")
        with pytest.raises(VhostUserFrontendError, match="serves 2 queues; this device needs 3"):
            Vm(be.path, num_request_queues=2)
        assert be.thread.is_alive()      # both hang-ups only ended their sessions
    finally:
        be.close()


def test_anonymous_ram_is_refused(share, sockdir):
    memory = GuestMemory.from_ranges([(0, MiB)])
    try:
        with pytest.raises(VhostUserFrontendError, match="not shareable"):
            VhostUserFsFrontend(VhostUserFsOptions(str(sockdir / "x.sock"), "share"), memory)
    finally:
        memory.close()


def test_backend_gone_mid_run_marks_the_device_and_calls_on_lost(share, sockdir):
    be = Backend(share, sockdir)
    lost: list[str] = []
    vm = Vm(be.path, on_lost=lost.append)
    try:
        vm.up()
        be.wait(lambda: be.stats()["vhost_user"]["active"], "rings not started")
        be.close()                                   # the back-end process goes away
        be.wait(lambda: lost, "on_lost was not called")
        assert lost == [f"vhost-user-fs back-end {be.path}: the back-end closed the connection "
                        "while the VM was running"]
        assert vm.driver.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
        vm.driver.w(VIRTIO_MMIO_STATUS, 0)           # a reset does not hang on the dead socket
    finally:
        vm.close()
