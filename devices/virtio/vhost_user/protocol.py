"""The vhost-user wire protocol, sans I/O: message header, payload structs, encode and decode.

Reference: QEMU `docs/interop/vhost-user.rst` ("Message Specification", "Front-end message types").
A message is a 12-byte header `request:u32 flags:u32 size:u32` followed by `size` payload bytes; file
descriptors travel beside it as SCM_RIGHTS ancillary data. All numbers are in the machine's native
byte order (the peers share a host); this module packs them with "=" (native order, standard sizes,
no padding), which is little endian on the x86-64 hosts we run on.

Nothing here touches a socket or a file descriptor: `decode_*` functions take bytes and raise
`ProtocolError` for anything malformed (wrong size, reserved bits set, an index or count out of
range), `encode_*` functions return bytes. The connection layer (connection.py) frames messages
and the backend (backend.py) decides what to do with them, so every check on peer input here can
be unit-tested with plain byte strings, and the same encoders serve a frontend written in a test.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

# -- header ------------------------------------------------------------------------------------
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 1 << 2
VHOST_USER_NEED_REPLY_MASK = 1 << 3
#: Flags a reply carries; QEMU refuses a reply whose flags are anything else.
REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK

#: Largest payload this implementation reads: SET_MEM_TABLE with 8 regions is 264 bytes and
#: GET_CONFIG with a full 256-byte config space 268; anything much larger is not a message we
#: know, and is refused before it is read so a peer cannot make us buffer unbounded data.
MAX_PAYLOAD_SIZE = 4096
#: At most this many descriptors ride on one message (VHOST_MEMORY_BASELINE_NREGIONS: QEMU
#: sends at most 8 memory regions without VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS).
MAX_FDS = 8
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: VHOST_USER_MAX_CONFIG_SIZE: the largest virtio config space a message may carry.
VHOST_USER_MAX_CONFIG_SIZE = 256


class Request(enum.IntEnum):
    """Front-end message types (the `request` field), with the spec's numbers."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end message types: sent by the back-end on the channel of SET_SLAVE_REQ_FD
    ("back-end request channel"; VHOST_USER_SLAVE_* in older texts). Only the virtio-fs DAX
    pair is used here (the numbers of QEMU's DAX series, rust-vmm's `vhost` crate, crosvm)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    FS_MAP = 6
    FS_UNMAP = 7
    FS_SYNC = 8
    FS_IO = 9


def backend_request_name(value: int) -> str:
    try:
        return "SLAVE_" + BackendRequest(value).name
    except ValueError:
        return f"back-end request {value}"


def request_name(value: int) -> str:
    try:
        return Request(value).name
    except ValueError:
        return f"request {value}"


# -- feature bits --------------------------------------------------------------------------------
#: The reserved virtio feature bit 30, reused to say "I speak GET/SET_PROTOCOL_FEATURES".
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: VHOST_F_LOG_ALL: dirty logging for migration (not supported here).
VHOST_F_LOG_ALL = 26


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    SLAVE_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    SLAVE_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# SET_VRING_KICK/CALL/ERR u64 payload: bits 0-7 the vring index, bit 8 "no fd in ancillary data".
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8
# struct vhost_vring_addr.flags: bit 0 = VHOST_VRING_F_LOG (log used-ring writes).
VHOST_VRING_F_LOG = 0

U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # struct vhost_vring_state {index, num}
VRING_ADDR = struct.Struct("=IIQQQQ")  # struct vhost_vring_addr {index, flags, desc, used, avail, log}
MEMORY_HEADER = struct.Struct("=II")  # VhostUserMemory {nregions, padding}
MEMORY_REGION = struct.Struct("=QQQQ")  # VhostUserMemoryRegion {gpa, size, user addr, mmap offset}
CONFIG_HEADER = struct.Struct("=III")  # VhostUserConfig {offset, size, flags} + payload bytes

#: Payload size of every request with a fixed-size payload (None: variable, checked by its decoder).
PAYLOAD_SIZES: dict[Request, int | None] = {
    Request.GET_FEATURES: 0,
    Request.SET_FEATURES: U64.size,
    Request.SET_OWNER: 0,
    Request.RESET_OWNER: 0,
    Request.SET_MEM_TABLE: None,
    Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size,
    Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size,
    Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size,
    Request.SET_VRING_ERR: U64.size,
    Request.GET_PROTOCOL_FEATURES: 0,
    Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.GET_QUEUE_NUM: 0,
    Request.SET_VRING_ENABLE: VRING_STATE.size,
    Request.GET_CONFIG: None,
    Request.SET_CONFIG: None,
    Request.SET_SLAVE_REQ_FD: 0,
}

#: Requests whose spec-defined reply carries a body; every other request is answered only when
#: the front-end set need_reply (REPLY_ACK), with a u64 status.
REPLY_REQUESTS = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
                            Request.GET_QUEUE_NUM, Request.GET_CONFIG})


class ProtocolError(ValueError):
    """A malformed message (or one we refuse); the text says what was wrong."""


# -- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & VHOST_USER_VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    def encode(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)


def decode_header(data: bytes, *, max_payload: int = MAX_PAYLOAD_SIZE) -> Header:
    """Parse and check a request header (from the front-end): version 1, not a reply, sane size."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    hdr = Header(*HEADER.unpack(data))
    if hdr.version != VHOST_USER_VERSION:
        raise ProtocolError(f"{request_name(hdr.request)}: protocol version {hdr.version}, expected "
                            f"{VHOST_USER_VERSION}")
    if hdr.is_reply:
        raise ProtocolError(f"{request_name(hdr.request)}: reply flag set on a request")
    if hdr.size > max_payload:
        raise ProtocolError(f"{request_name(hdr.request)}: payload of {hdr.size} bytes exceeds "
                            f"{max_payload}")
    return hdr


def decode_reply_header(data: bytes, *, max_payload: int = MAX_PAYLOAD_SIZE) -> Header:
    """Parse and check a reply header (front-end side: tests and a future frontend)."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"reply header is {len(data)} bytes, expected {HEADER_SIZE}")
    hdr = Header(*HEADER.unpack(data))
    if hdr.flags != REPLY_FLAGS:
        raise ProtocolError(f"{request_name(hdr.request)}: reply flags {hdr.flags:#x}, expected "
                            f"{REPLY_FLAGS:#x}")
    if hdr.size > max_payload:
        raise ProtocolError(f"{request_name(hdr.request)}: reply payload of {hdr.size} bytes")
    return hdr


@dataclass
class Message:
    """One received request: header, payload bytes, and the file descriptors that came with it.

    The message owns `fds` until a handler takes one with `take_fd` (which leaves -1 in its
    slot); `close_fds` closes whatever is left, so no descriptor a peer sends can leak.
    """

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def request(self) -> int:
        return self.header.request

    @property
    def name(self) -> str:
        return request_name(self.header.request)

    def take_fd(self, i: int) -> int:
        fd = self.fds[i]
        self.fds[i] = -1
        return fd

    def close_fds(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self.fds[i] = -1


def encode_message(request: int, payload: bytes = b"", *, flags: int = VHOST_USER_VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_request(request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    return encode_message(request, payload, flags=flags)


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    return encode_message(request, payload, flags=REPLY_FLAGS)


# -- payloads ------------------------------------------------------------------------------------
def check_size(msg_name: str, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{msg_name}: payload is {len(payload)} bytes, expected {size}")


def decode_u64(payload: bytes, what: str = "u64") -> int:
    check_size(what, payload, U64.size)
    return U64.unpack(payload)[0]


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


@dataclass(frozen=True)
class VringState:
    """struct vhost_vring_state: SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE."""

    index: int
    num: int

    @classmethod
    def decode(cls, payload: bytes, what: str = "vring state") -> VringState:
        check_size(what, payload, VRING_STATE.size)
        return cls(*VRING_STATE.unpack(payload))

    def encode(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """struct vhost_vring_addr: the ring addresses are front-end *user* addresses."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0

    @classmethod
    def decode(cls, payload: bytes) -> VringAddr:
        check_size("SET_VRING_ADDR", payload, VRING_ADDR.size)
        return cls(*VRING_ADDR.unpack(payload))

    def encode(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc_user_addr, self.used_user_addr,
                               self.avail_user_addr, self.log_guest_addr)


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: a vring index and whether an fd came with it."""

    index: int
    has_fd: bool

    @classmethod
    def decode(cls, payload: bytes, what: str = "vring fd") -> VringFile:
        value = decode_u64(payload, what)
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise ProtocolError(f"{what}: reserved bits set in {value:#x}")
        return cls(value & VHOST_USER_VRING_IDX_MASK, not value & VHOST_USER_VRING_NOFD_MASK)

    def encode(self) -> bytes:
        return U64.pack(self.index | (0 if self.has_fd else VHOST_USER_VRING_NOFD_MASK))


@dataclass(frozen=True)
class MemoryRegion:
    """VhostUserMemoryRegion: `size` bytes of guest RAM at `guest_addr`, which the front-end
    maps at `user_addr`, found at `mmap_offset` in the region's file descriptor."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return MEMORY_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


def decode_memory_table(payload: bytes, *, max_regions: int = VHOST_MEMORY_BASELINE_NREGIONS
                        ) -> list[MemoryRegion]:
    """SET_MEM_TABLE: `nregions`, padding, then that many regions.

    The payload must hold exactly `nregions` regions (QEMU sends 8 + 32 * n bytes); some
    front-ends send the whole fixed-size struct, so trailing room for up to `max_regions`
    regions is accepted and ignored. Values are checked by the memory layer (overlaps, overflow).
    """
    if len(payload) < MEMORY_HEADER.size:
        raise ProtocolError(f"SET_MEM_TABLE: payload of {len(payload)} bytes has no region count")
    nregions, _padding = MEMORY_HEADER.unpack_from(payload, 0)
    if not 1 <= nregions <= max_regions:
        raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions (1..{max_regions} supported)")
    need = MEMORY_HEADER.size + MEMORY_REGION.size * nregions
    full = MEMORY_HEADER.size + MEMORY_REGION.size * max_regions
    if len(payload) < need or len(payload) > full or (len(payload) - MEMORY_HEADER.size) % MEMORY_REGION.size:
        raise ProtocolError(f"SET_MEM_TABLE: payload of {len(payload)} bytes for {nregions} regions "
                            f"(expected {need})")
    return [MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size))
            for i in range(nregions)]


def encode_memory_table(regions: list[MemoryRegion]) -> bytes:
    return MEMORY_HEADER.pack(len(regions), 0) + b"".join(r.encode() for r in regions)


@dataclass(frozen=True)
class ConfigSpace:
    """VhostUserConfig: a window [offset, offset + size) of the device config space."""

    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def decode(cls, payload: bytes, what: str = "GET_CONFIG") -> ConfigSpace:
        if len(payload) < CONFIG_HEADER.size:
            raise ProtocolError(f"{what}: payload of {len(payload)} bytes has no config header")
        offset, size, flags = CONFIG_HEADER.unpack_from(payload, 0)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"{what}: config size {size} > {VHOST_USER_MAX_CONFIG_SIZE}")
        if len(payload) != CONFIG_HEADER.size + size:
            raise ProtocolError(f"{what}: payload is {len(payload)} bytes for a {size}-byte config "
                                f"window (expected {CONFIG_HEADER.size + size})")
        return cls(offset, size, flags, bytes(payload[CONFIG_HEADER.size:]))

    def encode(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data


# -- the back-end request channel: virtio-fs DAX ---------------------------------------------------
#: Entries in one VhostUserFSSlaveMsg (VHOST_USER_FS_SLAVE_ENTRIES).
FS_BACKEND_ENTRIES = 8
#: VhostUserFSSlaveMsg: fd_offset[8], c_offset[8], len[8], flags[8], all u64 (256 bytes).
FS_BACKEND_MSG = struct.Struct("=" + "Q" * (4 * FS_BACKEND_ENTRIES))
#: flags of an entry: map readable / writable (VHOST_USER_FS_FLAG_MAP_R/W).
FS_FLAG_MAP_R = 1 << 0
FS_FLAG_MAP_W = 1 << 1
FS_FLAGS_ALL = FS_FLAG_MAP_R | FS_FLAG_MAP_W
#: An FS_UNMAP entry of this length removes every mapping of the window (its c_offset must be 0).
FS_UNMAP_ALL = (1 << 64) - 1


@dataclass(frozen=True)
class FsMapEntry:
    """One range of a VhostUserFSSlaveMsg: ``length`` bytes of the file from ``fd_offset`` at
    ``cache_offset`` of the DAX window (the virtio-fs "cache" shared memory region)."""

    fd_offset: int
    cache_offset: int
    length: int
    flags: int


def encode_fs_backend_msg(entries: list[FsMapEntry]) -> bytes:
    """A VhostUserFSSlaveMsg with ``entries`` first and the rest zero (unused: length 0)."""
    if len(entries) > FS_BACKEND_ENTRIES:
        raise ValueError(f"{len(entries)} entries (at most {FS_BACKEND_ENTRIES})")
    pad = [FsMapEntry(0, 0, 0, 0)] * (FS_BACKEND_ENTRIES - len(entries))
    full = list(entries) + pad
    return FS_BACKEND_MSG.pack(*(e.fd_offset for e in full), *(e.cache_offset for e in full),
                               *(e.length for e in full), *(e.flags for e in full))


def decode_fs_backend_msg(payload: bytes, what: str = "FS_MAP") -> list[FsMapEntry]:
    """The used entries (length != 0, as QEMU and rust-vmm skip the others) of a
    VhostUserFSSlaveMsg. Size and flag bits are checked here; offsets against the window by its
    owner (DaxWindow.check_range), which alone knows its size."""
    check_size(what, payload, FS_BACKEND_MSG.size)
    v = FS_BACKEND_MSG.unpack(payload)
    n = FS_BACKEND_ENTRIES
    out = []
    for i in range(n):
        entry = FsMapEntry(v[i], v[n + i], v[2 * n + i], v[3 * n + i])
        if entry.flags & ~FS_FLAGS_ALL:
            raise ProtocolError(f"{what}: entry {i}: unknown flags {entry.flags:#x}")
        if entry.length:
            out.append(entry)
    return out
