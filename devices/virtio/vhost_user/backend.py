"""The vhost-user back-end (slave) side: turns front-end messages into a running VirtioDevice.

vhost-user is one more virtio transport beside virtio-mmio. Where the mmio transport learns the
queue layout from register writes and starts the device at DRIVER_OK, this one learns it from
messages and starts the device when the rings are ready, calling the very same
`device.activate(memory, interrupt, queues, queue_events)`:

- memory: `VhostUserMemory`, the regions of SET_MEM_TABLE mmap'd from their fds;
- interrupt: `VhostUserInterrupt`, the per-queue call eventfds of SET_VRING_CALL;
- queues: ordinary `Queue`s over guest-physical addresses, translated here from the front-end
  user addresses of SET_VRING_ADDR, with the available index of SET_VRING_BASE;
- queue_events: the kick eventfds of SET_VRING_KICK (the front-end's ioeventfds), which the
  device's worker polls directly, so a request never passes through this thread.

Ring life cycle (spec "Ring states"): a ring is *started* by SET_VRING_KICK and *stopped* by
GET_VRING_BASE, which replies with the next available index to process. With
VHOST_USER_F_PROTOCOL_FEATURES negotiated a ring is also disabled until SET_VRING_ENABLE 1. The
device runs all its rings with one worker, so it is started once every ring is ready (started,
enabled, configured, memory mapped) -- or, for a front-end that leaves some rings unused, when a
ready ring's kick fd becomes readable (the spec's "start on kick") -- and stopping one ring stops
the device; the other rings then report the index they had reached. Reconfiguring a running
device (a new memory table, a new kick fd) stops and restarts it; `VirtioDevice.reset` ends the
FUSE session in that case, which we log.

Every message is hostile input. A request we refuse (bad index, bad size, unknown request, a
ring address outside guest memory...) is answered with a non-zero u64 when the front-end set
need_reply (REPLY_ACK), a zero-length GET_CONFIG reply where the spec says so, and otherwise
raises `CloseConnection`: the front-end cannot be told in-band, and it would otherwise believe
the request worked or wait for a reply we cannot give. Nothing a peer sends raises anything else.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass

from devices.memory import GuestMemoryError
from devices.virtio.fs.inodes import proc_self_path
from devices.virtio.device import VirtioDevice
from devices.virtio.queue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Queue,
    QueueConfigError,
    ring_sizes,
)
from fuse.logthrottle import LogThrottle

from .interrupt import VhostUserInterrupt
from .memory import VhostUserMemory
from .protocol import (
    PAYLOAD_SIZES,
    REPLY_REQUESTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    ConfigSpace,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
    check_size,
    decode_memory_table,
    decode_u64,
    encode_reply,
    encode_u64,
)

logger = logging.getLogger(__name__)

#: Protocol features this back-end offers: MQ (GET_QUEUE_NUM), REPLY_ACK (need_reply acks on any
#: request) and CONFIG (GET_CONFIG answers the device config space: the virtio-fs tag).
OFFERED_PROTOCOL_FEATURES = ((1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)
                             | (1 << ProtocolFeature.CONFIG))

#: Requests that carry file descriptors (others must come without any).
_FD_REQUESTS = frozenset({Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                          Request.SET_VRING_ERR, Request.SET_SLAVE_REQ_FD})
_MAX_U16 = 0xFFFF


class RequestError(Exception):
    """A request this back-end refuses; the text says why."""


class CloseConnection(Exception):
    """The connection must end: a refused request the front-end cannot be told about in-band."""


@dataclass
class Vring:
    """What the front-end told us about one ring (nothing trusted until the device starts)."""

    max_size: int
    size: int = 0
    desc: int | None = None  # front-end user addresses from SET_VRING_ADDR
    avail: int | None = None
    used: int | None = None
    base: int = 0  # next available index to process (SET_VRING_BASE / reached when stopped)
    kick_fd: int = -1
    started: bool = False
    enabled: bool = False

    def close_kick(self) -> None:
        if self.kick_fd >= 0:
            os.close(self.kick_fd)
            self.kick_fd = -1


@dataclass
class BackendCounters:
    """Control-plane counters, kept across connections by the server."""

    connections: int = 0
    messages: int = 0
    refused: int = 0  # requests answered with an error (or ending the connection)
    closed_by_backend: int = 0  # connections we ended because of a bad message
    activations: int = 0
    device_stops: int = 0
    worker_cpu_s: float = 0.0  # CPU time of the device workers that have ended
    call_signals: int = 0  # call-eventfd writes of the sessions that have ended


    def snapshot(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, type(getattr(self, name))())


def thread_cpu_seconds(native_id: int | None) -> float | None:
    """CPU time of one of our threads (from /proc/self/task/TID/schedstat, in ns), or None.
    (Through inodes.proc_self_path: a jailed back-end reaches its procfs relative to its cwd.)"""
    if native_id is None:
        return None
    try:
        with open(proc_self_path(f"task/{native_id}/schedstat")) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def check_eventfd(fd: int, what: str) -> None:
    """Kick/call/error fds must be eventfds: the worker epolls and reads them 8 bytes at a time
    (a regular file cannot be epolled at all, and would stop the worker)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise RequestError(f"{what}: bad file descriptor: {e}") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        raise RequestError(f"{what}: descriptor is a file, not an eventfd")
    try:
        with open(proc_self_path(f"fdinfo/{fd}")) as f:
            info = f.read()
    except OSError:
        return  # no procfs reachable: the type check above is all we can do
    if "eventfd-count:" not in info:
        raise RequestError(f"{what}: descriptor is not an eventfd")


class VhostUserBackend:
    """One front-end session driving `device`. Not thread-safe: one connection thread calls it.

    `handle(msg)` returns the reply bytes to send (or None) and raises `CloseConnection`;
    `watched_kicks()`/`kicked()` implement start-on-kick; `close()` ends the session and leaves
    the device reset, ready for the next front-end.

    `backend_channel` (a `backend_req.BackendChannel`, the DAX window's mapper of a virtio-fs
    device with `dax: true`): SLAVE_REQ is offered and SET_SLAVE_REQ_FD connects it for the
    session. It needs REPLY_ACK too: a mapping the front-end did not confirm must not be
    reported to the guest as made.
    """

    def __init__(self, device: VirtioDevice, counters: BackendCounters | None = None,
                 backend_channel=None) -> None:
        self.device = device
        self.counters = counters if counters is not None else BackendCounters()
        self.num_queues = len(device.queue_max_sizes)
        if not 1 <= self.num_queues <= 0xFF + 1:
            raise ValueError("a vhost-user device has 1..256 queues")
        self.device_features = device.device_features()
        self.offered_features = self.device_features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES
        self.backend_channel = backend_channel
        if backend_channel is not None:
            self.offered_protocol_features |= 1 << ProtocolFeature.SLAVE_REQ
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.memory: VhostUserMemory | None = None
        self.vrings = [Vring(m) for m in device.queue_max_sizes]
        self.interrupt = VhostUserInterrupt(self.num_queues)
        self.active = False
        self._queues: list[Queue | None] = []
        self._log = LogThrottle(logger)
        self._handlers: dict[Request, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_SLAVE_REQ_FD: self._set_slave_req_fd,
        }

    # -- dispatch ---------------------------------------------------------------------------------
    def handle(self, msg: Message) -> bytes | None:
        """Process one request; returns the reply to send, if any. Closes every fd not kept."""
        self.counters.messages += 1
        logger.debug("vhost-user: %s size=%d fds=%d flags=%#x", msg.name, msg.header.size,
                      len(msg.fds), msg.header.flags)
        try:
            try:
                body = self._dispatch(msg)
            except (RequestError, ProtocolError, GuestMemoryError, QueueConfigError) as e:
                return self._refuse(msg, str(e))
        finally:
            msg.close_fds()
        if msg.request in REPLY_REQUESTS:
            return encode_reply(msg.request, body or b"")
        if msg.header.need_reply:
            return encode_reply(msg.request, encode_u64(0))
        return None

    def _dispatch(self, msg: Message) -> bytes | None:
        try:
            req = Request(msg.request)
        except ValueError:
            raise RequestError(f"unknown request {msg.request}") from None
        handler = self._handlers.get(req)
        if handler is None:
            raise RequestError(f"unsupported request {req.name}")
        size = PAYLOAD_SIZES[req]
        if size is not None:
            check_size(req.name, msg.payload, size)
        if msg.fds and req not in _FD_REQUESTS:
            raise RequestError(f"{req.name}: {len(msg.fds)} unexpected file descriptors")
        return handler(msg)

    def _refuse(self, msg: Message, reason: str) -> bytes:
        self.counters.refused += 1
        # One warning per request type and session (the set of keys is bounded), the rest at debug.
        kind = "unknown" if msg.name.startswith("request ") else msg.name
        self._log.once(kind, logging.WARNING,
                       "vhost-user: refusing %s: %s (further refusals of %s logged at debug level)",
                       msg.name, reason, kind)
        logger.debug("vhost-user: refusing %s: %s", msg.name, reason)
        if msg.request == Request.GET_CONFIG:
            return encode_reply(msg.request, b"")  # the spec's error: an empty payload
        if msg.header.need_reply and msg.request not in REPLY_REQUESTS:
            return encode_reply(msg.request, encode_u64(1))
        self.counters.closed_by_backend += 1
        raise CloseConnection(reason if reason.startswith(msg.name) else f"{msg.name}: {reason}")

    def _vring(self, index: int, what: str) -> Vring:
        if not 0 <= index < self.num_queues:
            raise RequestError(f"{what}: vring index {index} out of range (device has {self.num_queues})")
        return self.vrings[index]

    def _running(self, index: int) -> bool:
        return self.active and self._queues[index] is not None

    # -- features ---------------------------------------------------------------------------------
    @property
    def protocol_features_negotiated(self) -> bool:
        return bool(self.acked_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_features)

    def _set_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload, msg.name)
        if value & ~self.offered_features:
            raise RequestError(f"features {value & ~self.offered_features:#x} were not offered")
        if self.active and value != self.acked_features:
            raise RequestError("features changed while the device runs")
        self.acked_features = value
        self.device.ack_features(value & self.device_features)

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        value = decode_u64(msg.payload, msg.name)
        if value & ~self.offered_protocol_features:
            raise RequestError(f"protocol features {value & ~self.offered_protocol_features:#x} "
                               "were not offered")
        self.acked_protocol_features = value

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings", not as a reset of
        # the connection state.
        self._stop("RESET_OWNER", keep_started=False)
        for r in self.vrings:
            r.enabled = False

    def _set_slave_req_fd(self, msg: Message) -> None:
        acked = self.acked_protocol_features
        if self.backend_channel is None or not acked >> ProtocolFeature.SLAVE_REQ & 1:
            raise RequestError("SLAVE_REQ was not negotiated")
        if not acked >> ProtocolFeature.REPLY_ACK & 1:
            raise RequestError("the back-end request channel needs REPLY_ACK (FS_MAP acks)")
        if len(msg.fds) != 1:
            raise RequestError(f"{len(msg.fds)} file descriptors (needs 1)")
        fd = msg.take_fd(0)
        try:
            self.backend_channel.connect(fd)
        except (ValueError, OSError) as e:
            os.close(fd)
            raise RequestError(str(e)) from None
        logger.info("vhost-user: back-end request channel connected (DAX FS_MAP/FS_UNMAP)")

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(self.num_queues)

    # -- memory -----------------------------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> None:
        table = decode_memory_table(msg.payload)
        if len(msg.fds) != len(table):
            raise RequestError(f"{len(table)} regions but {len(msg.fds)} file descriptors")
        memory = VhostUserMemory.from_table(table, msg.fds)  # fds are closed by handle()
        was_active = self.active
        if was_active:
            logger.warning("vhost-user: new memory table while the device runs; restarting it "
                           "(the device's session state is lost)")
        self._stop("SET_MEM_TABLE", keep_started=True)
        old, self.memory = self.memory, memory
        if old is not None:
            old.close()
        self._maybe_activate(force=was_active)

    # -- rings ------------------------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> None:
        st = VringState.decode(msg.payload, msg.name)
        r = self._vring(st.index, msg.name)
        if self._running(st.index):
            raise RequestError(f"ring {st.index} is running")
        if not 1 <= st.num <= r.max_size or st.num & (st.num - 1):
            raise RequestError(f"ring {st.index}: size {st.num} is not a power of two in 1..{r.max_size}")
        r.size = st.num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.decode(msg.payload)
        r = self._vring(addr.index, msg.name)
        if self._running(addr.index):
            raise RequestError(f"ring {addr.index} is running")
        if addr.flags & ~(1 << VHOST_VRING_F_LOG):
            raise RequestError(f"ring {addr.index}: unknown flags {addr.flags:#x}")
        if addr.flags & (1 << VHOST_VRING_F_LOG):
            raise RequestError(f"ring {addr.index}: used-ring logging is not supported")
        if self.memory is not None and r.size:  # check now so the error names this message
            self._translate(addr.index, r.size, addr.desc_user_addr, addr.avail_user_addr,
                            addr.used_user_addr)
        r.desc, r.avail, r.used = addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr

    def _set_vring_base(self, msg: Message) -> None:
        st = VringState.decode(msg.payload, msg.name)
        r = self._vring(st.index, msg.name)
        if self._running(st.index):
            raise RequestError(f"ring {st.index} is running")
        if st.num > _MAX_U16:
            raise RequestError(f"ring {st.index}: base {st.num} is not a 16-bit ring index")
        r.base = st.num

    def _get_vring_base(self, msg: Message) -> bytes:
        st = VringState.decode(msg.payload, msg.name)
        r = self._vring(st.index, msg.name)
        self._stop(f"GET_VRING_BASE {st.index}", keep_started=False)
        r.started = False
        r.close_kick()
        return VringState(st.index, r.base).encode()

    def _vring_file(self, msg: Message, *, require_fd: bool = False) -> tuple[int, int]:
        """(index, fd or -1) of SET_VRING_KICK/CALL/ERR; the fd is taken from the message."""
        vf = VringFile.decode(msg.payload, msg.name)
        self._vring(vf.index, msg.name)
        if require_fd and not vf.has_fd:
            raise RequestError(f"ring {vf.index}: no fd (polling mode is not supported)")
        want = 1 if vf.has_fd else 0
        if len(msg.fds) != want:
            raise RequestError(f"ring {vf.index}: {len(msg.fds)} file descriptors, expected {want}")
        if not vf.has_fd:
            return vf.index, -1
        check_eventfd(msg.fds[0], f"{msg.name} ring {vf.index}")
        return vf.index, msg.take_fd(0)

    def _set_vring_kick(self, msg: Message) -> None:
        index, fd = self._vring_file(msg, require_fd=True)
        was_active = self.active
        if was_active:
            logger.info("vhost-user: new kick fd for ring %d while the device runs; restarting it", index)
            self._stop(f"SET_VRING_KICK {index}", keep_started=True)
        r = self.vrings[index]
        r.close_kick()
        r.kick_fd = fd
        r.started = True
        self._maybe_activate(force=was_active)

    def _set_vring_call(self, msg: Message) -> None:
        index, fd = self._vring_file(msg)
        self.interrupt.set_call_fd(index, fd)

    def _set_vring_err(self, msg: Message) -> None:
        index, fd = self._vring_file(msg)
        self.interrupt.set_err_fd(index, fd)

    def _set_vring_enable(self, msg: Message) -> None:
        st = VringState.decode(msg.payload, msg.name)
        r = self._vring(st.index, msg.name)
        if st.num not in (0, 1):
            raise RequestError(f"ring {st.index}: enable value {st.num} is not 0 or 1")
        r.enabled = bool(st.num)
        if r.enabled and self.active and not self._running(st.index) and self._ring_ready(r):
            # The device was started early, by a kick on a ring already enabled (QEMU enables
            # its rings one message at a time and may signal a kick fd between them): restart
            # it with this ring too, or nothing the guest puts on it is ever served. Seen with
            # QEMU 7.2: started with rings [0] only, the guest's INIT on ring 1 waited forever.
            logger.info("vhost-user: ring %d enabled after the device started; restarting it "
                        "with that ring", st.index)
            self._stop(f"SET_VRING_ENABLE {st.index}", keep_started=True)
            self._maybe_activate(force=True)
        elif r.enabled:
            self._maybe_activate()
        elif self._running(st.index):
            # "Disabled" means "process without side effects", which a file system cannot do;
            # the ring keeps being served until GET_VRING_BASE stops it (QEMU sends that next).
            logger.debug("vhost-user: ring %d disabled while running", st.index)

    # -- config space -----------------------------------------------------------------------------
    def _get_config(self, msg: Message) -> bytes:
        cfg = ConfigSpace.decode(msg.payload, msg.name)
        if cfg.offset + cfg.size > len(self.device.config):
            raise RequestError(f"config window {cfg.offset}+{cfg.size} beyond the "
                               f"{len(self.device.config)}-byte config space")
        data = self.device.read_config(cfg.offset, cfg.size)
        return ConfigSpace(cfg.offset, cfg.size, cfg.flags, data).encode()

    def _set_config(self, msg: Message) -> None:
        cfg = ConfigSpace.decode(msg.payload, msg.name)
        try:
            self.device.write_config(cfg.offset, cfg.data)
        except PermissionError as e:
            raise RequestError(f"config space: {e}") from None

    # -- starting and stopping the device ---------------------------------------------------------
    def _ring_ready(self, r: Vring) -> bool:
        return (r.started and r.kick_fd >= 0 and r.size > 0 and r.desc is not None
                and (r.enabled or not self.protocol_features_negotiated))

    def _translate(self, index: int, size: int, desc: int, avail: int, used: int) -> tuple[int, int, int]:
        assert self.memory is not None
        lengths = ring_sizes(size)
        out = []
        for name, addr, length in zip(("descriptor table", "available ring", "used ring"),
                                      (desc, avail, used), lengths):
            try:
                out.append(self.memory.translate_user(addr, length))
            except GuestMemoryError as e:
                raise RequestError(f"ring {index}: {name}: {e}") from None
        return out[0], out[1], out[2]

    def watched_kicks(self) -> list[int]:
        """Kick fds to poll while the device is stopped: a kick on a ready ring starts it."""
        if self.active or self.memory is None:
            return []
        return [r.kick_fd for r in self.vrings if self._ring_ready(r)]

    def kicked(self) -> None:
        """A watched kick fd became readable: start the device with the rings that are ready."""
        try:
            self._maybe_activate(force=True)
        except (RequestError, GuestMemoryError, QueueConfigError) as e:
            self.counters.refused += 1
            self.counters.closed_by_backend += 1
            raise CloseConnection(f"cannot start the rings: {e}") from None

    def _maybe_activate(self, force: bool = False) -> None:
        if self.active or self.memory is None:
            return
        ready = [i for i, r in enumerate(self.vrings) if self._ring_ready(r)]
        if not ready or (len(ready) < self.num_queues and not force):
            return
        event_idx = bool(self.acked_features >> VIRTIO_RING_F_EVENT_IDX & 1)
        indirect = bool(self.acked_features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        queues: list[Queue | None] = [None] * self.num_queues
        events = [-1] * self.num_queues
        try:
            for i in ready:
                r = self.vrings[i]
                assert r.avail is not None and r.used is not None and r.desc is not None
                desc, avail, used = self._translate(i, r.size, r.desc, r.avail, r.used)
                try:
                    q = Queue(self.memory, r.size, desc, avail, used, event_idx, indirect=indirect)
                except QueueConfigError as e:
                    raise RequestError(f"ring {i}: {e}") from None
                queues[i] = q
                q.next_avail = r.base
                q.next_used = self.memory.read_u16(used + 2)  # what the driver has already seen
                events[i] = r.kick_fd
            self.device.activate(self.memory, self.interrupt, queues, events)
        except BaseException:
            for opened in queues:
                if opened is not None:
                    opened.close()
            raise
        self._queues = queues
        self.active = True
        self.counters.activations += 1
        logger.info("vhost-user: device started with rings %s (sizes %s)", ready,
                    [self.vrings[i].size for i in ready])

    def _stop(self, why: str, *, keep_started: bool) -> None:
        """Stop the device's worker; each running ring remembers the index it reached."""
        if not self.active:
            return
        worker = getattr(self.device, "worker_thread", None)  # FsDevice exposes it; for metrics
        cpu = thread_cpu_seconds(worker.native_id if worker is not None else None)
        self.device.reset()
        if cpu is not None:
            self.counters.worker_cpu_s += cpu
        for i, q in enumerate(self._queues):
            if q is not None:
                self.vrings[i].base = q.next_avail
                q.close()
        self._queues = []
        self.active = False
        self.counters.device_stops += 1
        if not keep_started:
            for r in self.vrings:
                r.started = False
        logger.info("vhost-user: device stopped (%s) at ring indices %s", why,
                    [r.base for r in self.vrings])

    def close(self) -> None:
        """The connection ended: stop the device and release every fd and mapping."""
        try:
            self._stop("connection closed", keep_started=False)
        finally:
            if self.backend_channel is not None:   # after the device's last FS_UNMAP
                self.backend_channel.disconnect()
            for r in self.vrings:
                r.close_kick()
            self.interrupt.close()
            if self.memory is not None:
                self.memory.close()
                self.memory = None

