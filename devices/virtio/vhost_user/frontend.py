"""The vhost-user front-end side: a virtio-fs device whose rings another process serves.

`python -m vmm run` with a `type: vhost-user-fs` device puts this `VirtioDevice` behind the ordinary
virtio-mmio transport (`devices/virtio/mmio.py`), which stays the owner of the registers, the status
state machine and the config space. What the device would do itself -- serve the queues -- it hands
to a back-end process over the vhost-user socket (QEMU's `docs/interop/vhost-user.rst`), exactly as
QEMU's `vhost-user-fs-device` does with virtiofsd:

- connecting (`VhostUserFsFrontend.__init__`, while the VM is assembled): SET_OWNER, GET_FEATURES,
  GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG where offered), GET_QUEUE_NUM (the back-end must
  serve 1 + num_request_queues rings), GET_CONFIG (the back-end's tag must be the configured one:
  a VM pointed at the wrong socket fails at once instead of mounting a surprise), SET_MEM_TABLE
  (guest RAM as memfd fds and offsets; the RAM must be `GuestMemory(..., map_memfd)`);
- the driver's FEATURES_OK: the features it accepted are forwarded with SET_FEATURES at DRIVER_OK;
- DRIVER_OK (`activate`): per ready ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (driver
  addresses translated to this process's *user* addresses of its RAM mapping), SET_VRING_KICK with
  the transport's queue eventfd -- already a KVM ioeventfd on QueueNotify --, SET_VRING_CALL with
  the transport's irqfd, SET_VRING_ERR, then SET_VRING_ENABLE. From then on KVM signals the
  back-end's kick fd and the back-end's call writes inject the interrupt: **no request passes
  through this process**;
- reset (the driver writes Status 0, or the VM ends): GET_VRING_BASE per started ring.

With a DAX window (`dax_window_size`, only for the VMM's own sandboxed fs child, vmm/sandbox.py)
the front-end keeps the real `DaxWindow` -- reserved address space registered as a KVM memory
slot, reported as shared memory region 0 -- and also negotiates SLAVE_REQ (with REPLY_ACK),
hands the back-end one end of a socketpair with SET_SLAVE_REQ_FD and serves the back-end's
FS_MAP/FS_UNMAP requests on it (`backend_req.FsMapServer`). A `type: vhost-user-fs` device (a
back-end we did not start) gets no window: the VMM would have to guess its size, and the
back-ends one points us at (C virtiofsd, upstream Rust virtiofsd) have no DAX.

Because the call fd is the irqfd itself, the transport never sees a used-ring interrupt; the
transport reports the VRING bit in InterruptStatus whenever such a device is active
(`VirtioDevice.signals_rings_directly`, see mmio.py for why and what it costs).

With REPLY_ACK every message that changes state asks for an ack, so a refusal is seen at the
message that caused it. Every failure -- no back-end on the socket, a refusal, a reply that does
not parse, a back-end that stalls or goes away -- is a `VhostUserFrontendError` whose one-line text
names the socket. While the VM is assembled it ends the run with that line; at DRIVER_OK it makes
the transport report DEVICE_NEEDS_RESET; a back-end that hangs up later is noticed by a monitor
thread (it polls the socket for the hang-up and the rings' error eventfds), which marks the device
as needing a reset and calls `on_lost`, and the VMM ends the run with the message.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from devices.memory import GuestMemory, GuestMemoryError
from devices.virtio.device import BASE_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_ID_FS, VirtioDevice
from devices.virtio.fs.dax import DaxWindow, HasDaxWindow
from devices.virtio.fs.device import QUEUE_SIZE, config_space
from devices.virtio.fs.options import FS_MAX_TAG_LEN, check_tag
from devices.virtio.interrupt import Interrupt, VirtioInterrupt
from devices.virtio.queue import Queue

from .backend_req import FsMapServer
from .connection import Connection, ConnectionClosed
from .protocol import (
    REPLY_REQUESTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    MemoryRegion,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
    decode_u64,
    encode_memory_table,
    encode_request,
    encode_u64,
    request_name,
)

logger = logging.getLogger(__name__)

#: Protocol features this front-end uses when the back-end offers them.
WANTED_PROTOCOL_FEATURES = ((1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)
                            | (1 << ProtocolFeature.CONFIG))
#: What a DAX window needs besides: the back-end request channel, and acks on it.
DAX_PROTOCOL_FEATURES = (1 << ProtocolFeature.SLAVE_REQ) | (1 << ProtocolFeature.REPLY_ACK)
#: How long one reply may take (the back-end answers from its control thread; QEMU waits forever,
#: we would rather end the VM with a message than hang a vCPU thread).
REPLY_TIMEOUT = 10.0
_CONFIG_SIZE = FS_MAX_TAG_LEN + 4  # struct virtio_fs_config


@dataclass(frozen=True)
class VhostUserFsOptions:
    """A `type: vhost-user-fs` device: the back-end's socket, the tag the guest mounts, and how many
    request queues the device announces (the back-end must serve 1 + num_request_queues rings)."""

    socket: str
    tag: str
    num_request_queues: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.socket, str) or not self.socket or "\0" in self.socket:
            raise ValueError(f"socket must be a non-empty path, got {self.socket!r}")
        check_tag(self.tag)
        n = self.num_request_queues
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise ValueError(f"num_request_queues must be an integer between 1 and 64, got {n!r}")


class VhostUserFrontendError(Exception):
    """The back-end is missing, refused something, or went away; the text names the socket."""

    def __init__(self, socket_path: str, message: str) -> None:
        super().__init__(f"vhost-user-fs back-end {socket_path}: {message}")
        self.socket_path = socket_path


class VhostUserFsFrontend(HasDaxWindow, VirtioDevice):
    """A virtio-fs device served by a vhost-user back-end on `options.socket`.

    `memory` must be shareable (`devices.memory.map_memfd` regions): its fds go to the back-end.
    `on_lost(message)` is called (from the monitor thread) once if the back-end goes away while the
    VM runs. Construction connects and negotiates; it raises `VhostUserFrontendError`.
    `sock`: an already-connected socket to use instead of connecting to `options.socket` (the
    VMM's own sandboxed fs child on a socketpair; `options.socket` then only names it).
    `dax_window_size` (bytes, 0: none): keep a DAX window the back-end maps into over the
    back-end request channel; `dax_max_files` bounds the files it may map at once.
    """

    device_type = VIRTIO_ID_FS
    signals_rings_directly = True

    def __init__(self, options: VhostUserFsOptions, memory: GuestMemory, *,
                 on_lost: Callable[[str], None] | None = None, timeout: float = REPLY_TIMEOUT,
                 queue_size: int = QUEUE_SIZE, sock: socket.socket | None = None,
                 dax_window_size: int = 0, dax_max_files: int | None = None) -> None:
        super().__init__()
        self.options = options
        self.path = options.socket
        self.memory = memory
        self.on_lost = on_lost
        self.num_queues = 1 + options.num_request_queues
        self.queue_max_sizes = [queue_size] * self.num_queues
        self.config = config_space(options.tag, options.num_request_queues)
        self._lock = threading.Lock()  # one message exchange at a time
        self.backend_features = 0
        self.protocol_features = 0
        self.active = False
        self.lost: str | None = None
        self._closing = False
        self._started: list[int] = []  # rings the back-end is serving
        self._interrupt: VirtioInterrupt | None = None  # the transport's, from the first activate
        self._err_fds: list[int] = []
        self.counters = {"messages": 0, "activations": 0, "resets": 0, "ring_errors": 0}
        self.dax_window: DaxWindow | None = None
        self._dax_server: FsMapServer | None = None
        if not memory.shareable:
            raise VhostUserFrontendError(self.path, "guest RAM is not shareable (the VMM must map it "
                                         "from a memfd for a vhost-user device)")
        if dax_window_size:
            self.dax_window = DaxWindow(dax_window_size, max_files=dax_max_files)
        try:
            if sock is None:
                self.conn = self._connect(timeout)
            else:
                sock.settimeout(timeout)
                self.conn = Connection(sock, timeout=timeout)
        except BaseException:
            if self.dax_window is not None:
                self.dax_window.close()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._negotiate()
            self._err_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)]
        except BaseException:
            self._release()
            raise
        self._monitor = threading.Thread(target=self._watch, name=f"vhost-user-fs:{options.tag}",
                                         daemon=True)
        self._monitor.start()

    # -- connection -------------------------------------------------------------------------------
    def _connect(self, timeout: float) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise VhostUserFrontendError(self.path, f"cannot connect: {e.strerror or e}") from None
        logger.info("vhost-user-fs %s: connected to %s", self.options.tag, self.path)
        return Connection(sock, timeout=timeout)

    def _error(self, message: str) -> VhostUserFrontendError:
        return VhostUserFrontendError(self.path, message)

    def _exchange(self, request: Request, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
                  *, ack: bool = True) -> Message | None:
        """Send one request; wait for its reply (requests that have one) or its ack (when REPLY_ACK
        is negotiated and `ack`). Raises VhostUserFrontendError naming the request."""
        has_reply = request in REPLY_REQUESTS
        need_reply = ack and not has_reply and self._reply_ack
        with self._lock:
            if self.lost is not None:
                raise self._error(f"{request.name}: the back-end is gone ({self.lost})")
            try:
                self.conn.send(encode_request(request, payload, need_reply=need_reply), fds)
                self.counters["messages"] += 1
                if not (has_reply or need_reply):
                    return None
                reply = self.conn.recv_reply()
            except ConnectionClosed as e:
                raise self._error(f"{request.name}: the back-end closed the connection ({e})") from None
            except ProtocolError as e:
                raise self._error(f"{request.name}: {e}") from None
            except OSError as e:
                raise self._error(f"{request.name}: {e}") from None
        reply.close_fds()  # no reply we use carries descriptors
        if reply.request != request:
            raise self._error(f"{request.name}: the reply is for {request_name(reply.request)}")
        if need_reply:
            try:
                status = decode_u64(reply.payload, f"{request.name} ack")
            except ProtocolError as e:
                raise self._error(str(e)) from None
            if status != 0:
                raise self._error(f"{request.name} refused (status {status})")
        return reply

    @property
    def _reply_ack(self) -> bool:
        return bool(self.protocol_features >> ProtocolFeature.REPLY_ACK & 1)

    def _u64(self, request: Request) -> int:
        reply = self._exchange(request)
        assert reply is not None
        try:
            return decode_u64(reply.payload, request.name)
        except ProtocolError as e:
            raise self._error(str(e)) from None

    # -- negotiation (while the VM is assembled) --------------------------------------------------
    def _negotiate(self) -> None:
        self._exchange(Request.SET_OWNER, ack=False)  # acks need protocol features: not yet
        self.backend_features = self._u64(Request.GET_FEATURES)
        if not self.backend_features >> VIRTIO_F_VERSION_1 & 1:
            raise self._error("the back-end does not offer VIRTIO_F_VERSION_1")
        if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = self._u64(Request.GET_PROTOCOL_FEATURES)
            wanted = offered & WANTED_PROTOCOL_FEATURES
            if self.dax_window is not None:
                wanted |= offered & DAX_PROTOCOL_FEATURES
            self._exchange(Request.SET_PROTOCOL_FEATURES, encode_u64(wanted), ack=False)
            self.protocol_features = wanted
        if self.dax_window is not None:
            if self.protocol_features & DAX_PROTOCOL_FEATURES != DAX_PROTOCOL_FEATURES:
                raise self._error("the back-end does not offer SLAVE_REQ with REPLY_ACK, so it "
                                  "cannot map files into the DAX window")
            self._open_dax_channel()
        if self.protocol_features >> ProtocolFeature.MQ & 1:
            served = self._u64(Request.GET_QUEUE_NUM)
            if served < self.num_queues:
                raise self._error(f"the back-end serves {served} queues; this device needs "
                                  f"{self.num_queues} (num_request_queues {self.options.num_request_queues})")
        if self.protocol_features >> ProtocolFeature.CONFIG & 1:
            self._check_tag()
        self._send_mem_table()
        logger.info("vhost-user-fs %s: back-end features %#x, protocol features %#x",
                    self.options.tag, self.backend_features, self.protocol_features)

    def _open_dax_channel(self) -> None:
        """SET_SLAVE_REQ_FD: one end of a socketpair to the back-end, the other served here."""
        assert self.dax_window is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._exchange(Request.SET_SLAVE_REQ_FD, b"", [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._dax_server = FsMapServer(self.dax_window, ours, self.options.tag)
        self._dax_server.start()

    def _check_tag(self) -> None:
        reply = self._exchange(Request.GET_CONFIG, ConfigSpace(0, _CONFIG_SIZE, 0, bytes(_CONFIG_SIZE)).encode())
        assert reply is not None
        if not reply.payload:
            logger.warning("vhost-user-fs %s: the back-end on %s offers CONFIG but refused GET_CONFIG; "
                           "its tag is not checked", self.options.tag, self.path)
            return
        try:
            cfg = ConfigSpace.decode(reply.payload)
        except ProtocolError as e:
            raise self._error(f"GET_CONFIG: {e}") from None
        tag = cfg.data[:FS_MAX_TAG_LEN].split(b"\0", 1)[0].decode("utf-8", "replace")
        if cfg.size < FS_MAX_TAG_LEN or tag != self.options.tag:
            raise self._error(f"the back-end serves tag {tag!r}, the VM config says "
                              f"{self.options.tag!r}")

    def _send_mem_table(self) -> None:
        table = [MemoryRegion(r.gpa, r.size, r.host_addr, r.file_offset) for r in self.memory.regions]
        self._exchange(Request.SET_MEM_TABLE, encode_memory_table(table),
                       [r.fd for r in self.memory.regions])

    # -- VirtioDevice -----------------------------------------------------------------------------
    def device_features(self) -> int:
        """What the back-end serves, of what this transport and the guest's ring code support."""
        return self.backend_features & BASE_FEATURES

    def activate(self, memory, interrupt: VirtioInterrupt, queues: list[Queue | None],
                 queue_events: list[int]) -> None:
        """DRIVER_OK: hand every ready ring to the back-end (raises VhostUserFrontendError)."""
        if self.active:
            raise self._error("the device is already active")
        if not isinstance(interrupt, Interrupt):   # the back-end signals the guest's irqfd directly
            raise TypeError("a vhost-user front-end needs a virtio-mmio Interrupt (its irqfd)")
        features = self.acked_features
        if self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self._interrupt = interrupt
        started: list[int] = []
        try:
            self._exchange(Request.SET_FEATURES, encode_u64(features))
            for i, q in enumerate(queues):
                if q is None:
                    continue
                try:
                    desc = self.memory.host_address(q.desc_table, q.size * 16)
                    avail = self.memory.host_address(q.avail_ring, 6 + 2 * q.size)
                    used = self.memory.host_address(q.used_ring, 6 + 8 * q.size)
                except GuestMemoryError as e:
                    raise self._error(f"ring {i}: {e}") from None
                self._exchange(Request.SET_VRING_NUM, VringState(i, q.size).encode())
                self._exchange(Request.SET_VRING_BASE, VringState(i, q.next_avail).encode())
                self._exchange(Request.SET_VRING_ADDR, VringAddr(i, 0, desc, used, avail).encode())
                # From SET_VRING_KICK on the back-end owns the ring (the spec's "started").
                started.append(i)
                self._exchange(Request.SET_VRING_KICK, VringFile(i, True).encode(), [queue_events[i]])
                self._exchange(Request.SET_VRING_CALL, VringFile(i, True).encode(), [interrupt.irq_fd])
                self._exchange(Request.SET_VRING_ERR, VringFile(i, True).encode(), [self._err_fds[i]])
            if features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:  # rings start disabled then
                for i in started:
                    self._exchange(Request.SET_VRING_ENABLE, VringState(i, 1).encode())
        except VhostUserFrontendError:
            self._started = started
            self._stop_rings()
            raise
        self._started = started
        self.active = True
        self.counters["activations"] += 1
        logger.info("vhost-user-fs %s: rings %s handed to the back-end on %s", self.options.tag,
                    started, self.path)

    def _stop_rings(self) -> None:
        """GET_VRING_BASE for every started ring: the back-end stops serving it. Never raises."""
        started, self._started = self._started, []
        for i in started:
            try:
                reply = self._exchange(Request.GET_VRING_BASE, VringState(i, 0).encode())
                assert reply is not None
                base = VringState.decode(reply.payload, "GET_VRING_BASE").num
                logger.debug("vhost-user-fs %s: ring %d stopped at %d", self.options.tag, i, base)
            except (VhostUserFrontendError, ProtocolError) as e:
                logger.debug("vhost-user-fs %s: stopping ring %d: %s", self.options.tag, i, e)
                if self.lost is not None:
                    break

    def reset(self) -> None:
        """Stop the back-end's rings (the driver reset the device, or the VM ends). Never raises."""
        was_active, self.active = self.active, False
        self._stop_rings()
        if self.dax_window is not None:
            # The back-end unmapped its ranges as its session ended (FS_UNMAP); whatever a
            # back-end that could not left behind goes too: mappings die with the device.
            self.dax_window.reset()
        if was_active:
            self.counters["resets"] += 1
        for fd in self._err_fds:  # errors of the old rings are of no interest any more
            try:
                os.eventfd_read(fd)
            except OSError:
                pass

    def close(self) -> None:
        """The VM goes away: stop the rings, hang up (the back-end then waits for its next
        front-end), release every fd. Idempotent."""
        if self._closing:
            return
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._monitor.join(5)
        self.reset()
        self._release()

    def _release(self) -> None:
        if self._dax_server is not None:
            self._dax_server.close()
            self._dax_server = None
        if self.dax_window is not None:   # the VMM removed its memory slot before closing us
            self.dax_window.close()
        self.conn.close()
        for fd in self._err_fds:
            os.close(fd)
        self._err_fds = []
        for fd in (getattr(self, "_wake_r", -1), getattr(self, "_wake_w", -1)):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the monitor thread -----------------------------------------------------------------------
    def _watch(self) -> None:
        """Wait for the back-end to hang up (or report a broken ring) while the VM runs."""
        poller = select.poll()
        sock_fd = self.conn.fileno()
        # Only the hang-up: replies are read by the thread that sent the request.
        poller.register(sock_fd, select.POLLRDHUP)
        poller.register(self._wake_r, select.POLLIN)
        for fd in self._err_fds:
            poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll()
            for fd, _ev in events:
                if fd == self._wake_r:
                    return
                if fd == sock_fd:
                    self._backend_lost("the back-end closed the connection")
                    return
                try:
                    os.eventfd_read(fd)
                except OSError:
                    continue
                self.counters["ring_errors"] += 1
                ring = self._err_fds.index(fd) if fd in self._err_fds else -1
                logger.error("vhost-user-fs %s: the back-end on %s reports an error on ring %d; "
                             "the device needs a reset", self.options.tag, self.path, ring)
                self._needs_reset()

    def _backend_lost(self, why: str) -> None:
        if self._closing:
            return
        self.lost = why
        message = f"vhost-user-fs back-end {self.path}: {why} while the VM was running"
        # With on_lost the VMM prints the message once as its exit line; otherwise log it here.
        logger.log(logging.INFO if self.on_lost else logging.ERROR, "%s; the device needs a reset",
                   message)
        self._needs_reset()
        if self.on_lost is not None:
            self.on_lost(message)

    def _needs_reset(self) -> None:
        """DEVICE_NEEDS_RESET through the transport's interrupt (once the driver started us)."""
        if self._interrupt is not None:
            self._interrupt.signal_needs_reset()

    def reset_metrics(self) -> None:
        for key in self.counters:
            self.counters[key] = 0

    def metrics(self) -> dict:
        m: dict = {"vhost_user_frontend": {
            "socket": self.path, "active": self.active, "lost": self.lost,
            "backend_features": self.backend_features, "acked_features": self.acked_features,
            "protocol_features": self.protocol_features, **self.counters}}
        if self.dax_window is not None:
            # The window the guest really sees (setups, truncation repairs) is this one.
            m["dax"] = self.dax_window.metrics()
            if self._dax_server is not None:
                m["dax"]["channel"] = self._dax_server.metrics()
        return m
