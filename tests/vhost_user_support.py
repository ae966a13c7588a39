"""A small vhost-user front-end for tests: real memfd guest RAM, real sockets, real eventfds.

`MemfdGuest` is guest RAM the way QEMU's memory-backend-memfd provides it: memfds mapped
MAP_SHARED in this process, whose *user addresses* (where this process mapped them) are what a
front-end puts into SET_VRING_ADDR. It offers the few accessors `tests.fakes.FakeDriverQueue`
needs to lay out rings and buffers by guest-physical address.

`Frontend` speaks the protocol over a socket with the encoders of
`devices.virtio.vhost_user.protocol`, and `bring_up()` does what QEMU's vhost_dev_start does.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import threading

from devices.virtio.vhost_user.connection import Connection
from devices.virtio.vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryRegion,
    Message,
    Request,
    VringAddr,
    VringFile,
    VringState,
    decode_u64,
    encode_memory_table,
    encode_request,
    encode_u64,
)
from tests.fakes import FakeDriverQueue

WAIT_S = 30  # a bound on waiting, never a timing assertion


class MemfdGuest:
    """Guest RAM in memfds: `regions` is [(gpa, size)], each region its own memfd, or all regions
    at successive offsets of one memfd with `one_file=True` (so mmap_offset is exercised)."""

    def __init__(self, regions: list[tuple[int, int]], *, one_file: bool = False, seal: bool = True,
                 file_offset: int = 0) -> None:
        self.regions: list[tuple[int, int, int, int, mmap.mmap, int]] = []  # gpa, size, fd, off, mm, uaddr
        total = sum(size for _, size in regions)
        shared_fd = -1
        if one_file:
            shared_fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(shared_fd, file_offset + total)
        offset = file_offset
        for gpa, size in regions:
            if one_file:
                fd, off = os.dup(shared_fd), offset
                offset += size
            else:
                fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, file_offset + size)
                off = file_offset
            page = off - off % mmap.PAGESIZE
            mm = mmap.mmap(fd, off - page + size, flags=mmap.MAP_SHARED, offset=page)
            anchor = ctypes.c_char.from_buffer(mm)
            uaddr = ctypes.addressof(anchor) + (off - page)
            del anchor
            self.regions.append((gpa, size, fd, off, mm, uaddr))
        if shared_fd >= 0:
            os.close(shared_fd)
        if seal:
            import fcntl
            for _gpa, _size, fd, _off, _mm, _u in self.regions:
                try:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
                except OSError:
                    pass

    def table(self) -> list[MemoryRegion]:
        return [MemoryRegion(gpa, size, uaddr, off) for gpa, size, _fd, off, _mm, uaddr in self.regions]

    def fds(self) -> list[int]:
        return [r[2] for r in self.regions]

    def _locate(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        for rgpa, size, _fd, off, mm, _u in self.regions:
            if rgpa <= gpa and gpa + length <= rgpa + size:
                return mm, gpa - rgpa + (off % mmap.PAGESIZE)
        raise ValueError(f"test guest: {gpa:#x}+{length} is in no region")

    def user_addr(self, gpa: int) -> int:
        for rgpa, size, _fd, _off, _mm, uaddr in self.regions:
            if rgpa <= gpa < rgpa + size:
                return uaddr + gpa - rgpa
        raise ValueError(f"test guest: {gpa:#x} is in no region")

    def write(self, gpa: int, data: bytes) -> None:
        mm, off = self._locate(gpa, len(data))
        mm[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        mm, off = self._locate(gpa, length)
        return bytes(mm[off:off + length])

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def close(self) -> None:
        for _gpa, _size, fd, _off, mm, _u in self.regions:
            mm.close()
            os.close(fd)
        self.regions = []


class Frontend:
    """The front-end end of a vhost-user socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.conn = Connection(sock, timeout=WAIT_S)
        self.kicks: list[int] = []
        self.calls: list[int] = []

    def close(self) -> None:
        self.conn.close()
        for fd in self.kicks + self.calls:
            os.close(fd)
        self.kicks, self.calls = [], []

    def send(self, request: int, payload: bytes = b"", fds=(), *, need_reply: bool = False) -> None:
        self.conn.send(encode_request(request, payload, need_reply=need_reply), fds)

    def reply(self) -> Message:
        return self.conn.recv_reply()

    def call(self, request: int, payload: bytes = b"", fds=(), *, need_reply: bool = False) -> Message:
        """Send and wait for the reply."""
        self.send(request, payload, fds, need_reply=need_reply)
        msg = self.reply()
        assert msg.request == request, (msg.request, request)
        return msg

    def ack(self, request: int, payload: bytes = b"", fds=()) -> int:
        """Send with need_reply and return the u64 status (0 = success)."""
        return decode_u64(self.call(request, payload, fds, need_reply=True).payload)

    def u64(self, request: int) -> int:
        return decode_u64(self.call(request).payload)

    def closed_by_peer(self, timeout: float = WAIT_S) -> bool:
        """True once the back-end has closed the connection (EOF)."""
        r, _, _ = select.select([self.conn.sock], [], [], timeout)
        if not r:
            return False
        try:
            return self.conn.sock.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    # -- QEMU's vhost_dev_start, step by step ------------------------------------------------------
    def negotiate(self, features: int | None = None, protocol: int | None = None) -> tuple[int, int]:
        offered = self.u64(Request.GET_FEATURES)
        proto = self.u64(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(proto if protocol is None else protocol))
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, encode_u64(offered if features is None else features))
        return offered, proto

    def set_mem_table(self, guest: MemfdGuest, *, need_reply: bool = True) -> int | None:
        payload = encode_memory_table(guest.table())
        if need_reply:
            return self.ack(Request.SET_MEM_TABLE, payload, guest.fds())
        self.send(Request.SET_MEM_TABLE, payload, guest.fds())
        return None

    def setup_ring(self, index: int, q: FakeDriverQueue, guest: MemfdGuest, *, base: int = 0,
                   enable: bool = True) -> None:
        """NUM, BASE, ADDR, KICK, CALL (and ENABLE) for ring `index` laid out by `q`."""
        while len(self.kicks) <= index:
            self.kicks.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.calls.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self.send(Request.SET_VRING_NUM, VringState(index, q.size).encode())
        self.send(Request.SET_VRING_BASE, VringState(index, base).encode())
        self.send(Request.SET_VRING_ADDR, VringAddr(index, 0, guest.user_addr(q.desc), guest.user_addr(q.used),
                                                    guest.user_addr(q.avail)).encode())
        self.send(Request.SET_VRING_KICK, VringFile(index, True).encode(), [self.kicks[index]])
        self.send(Request.SET_VRING_CALL, VringFile(index, True).encode(), [self.calls[index]])
        if enable:
            self.send(Request.SET_VRING_ENABLE, VringState(index, 1).encode())

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def wait_call(self, index: int, timeout: float = WAIT_S) -> int:
        r, _, _ = select.select([self.calls[index]], [], [], timeout)
        assert r, f"no call on ring {index} within {timeout}s"
        return os.eventfd_read(self.calls[index])

    def get_vring_base(self, index: int) -> int:
        st = VringState.decode(self.call(Request.GET_VRING_BASE, VringState(index, 0).encode()).payload)
        assert st.index == index
        return st.num


def serve_in_thread(server, sock: socket.socket) -> threading.Thread:
    """Run `server.serve_connection(sock)` on a thread (the test is the front-end)."""
    t = threading.Thread(target=server.serve_connection, args=(sock,), name="vhost-user-test", daemon=True)
    t.start()
    return t


PROTOCOL_FEATURES_BIT = 1 << VHOST_USER_F_PROTOCOL_FEATURES
