"""vhost-user wire format: every struct we decode, checked against the spec and linux/vhost_types.h.

The payload structs of vhost-user are the kernel vhost ioctl structs (vhost_vring_state,
vhost_vring_addr, vhost_memory + vhost_memory_region), so their layout is checked by compiling a
C program against the installed UAPI header, as fuse/abi.py is checked against linux/fuse.h.
"""

from __future__ import annotations

import subprocess

import pytest

from devices.virtio.vhost_user import protocol as p
from devices.virtio.vhost_user.protocol import (
    ConfigSpace,
    MemoryRegion,
    ProtocolError,
    Request,
    VringAddr,
    VringFile,
    VringState,
)


def test_spec_numbers():
    # docs/interop/vhost-user.rst, "Front-end message types" and "Protocol features"
    assert [Request.GET_FEATURES, Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.GET_PROTOCOL_FEATURES,
            Request.GET_QUEUE_NUM, Request.SET_VRING_ENABLE, Request.GET_CONFIG, Request.GET_STATUS] == \
        [1, 5, 12, 15, 17, 18, 24, 40]
    assert (p.ProtocolFeature.MQ, p.ProtocolFeature.REPLY_ACK, p.ProtocolFeature.CONFIG,
            p.ProtocolFeature.STATUS) == (0, 3, 9, 16)
    assert p.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert (p.VHOST_USER_VERSION, p.VHOST_USER_REPLY_MASK, p.VHOST_USER_NEED_REPLY_MASK) == (1, 4, 8)
    assert p.REPLY_FLAGS == 0x5
    assert (p.HEADER_SIZE, p.VRING_STATE.size, p.VRING_ADDR.size, p.MEMORY_REGION.size,
            p.CONFIG_HEADER.size) == (12, 8, 40, 32, 12)


def test_layout_matches_linux_vhost_types(tmp_path):
    src = tmp_path / "layout.c"
    src.write_text(r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/vhost_types.h>
int main(void) {
    printf("%zu %zu %zu\n", sizeof(struct vhost_vring_state), offsetof(struct vhost_vring_state, index),
           offsetof(struct vhost_vring_state, num));
    printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(struct vhost_vring_addr),
           offsetof(struct vhost_vring_addr, index), offsetof(struct vhost_vring_addr, flags),
           offsetof(struct vhost_vring_addr, desc_user_addr), offsetof(struct vhost_vring_addr, used_user_addr),
           offsetof(struct vhost_vring_addr, avail_user_addr), offsetof(struct vhost_vring_addr, log_guest_addr));
    printf("%zu %zu %zu %zu %zu\n", sizeof(struct vhost_memory_region),
           offsetof(struct vhost_memory_region, guest_phys_addr), offsetof(struct vhost_memory_region, memory_size),
           offsetof(struct vhost_memory_region, userspace_addr), offsetof(struct vhost_memory_region, flags_padding));
    printf("%zu %zu %d %d\n", sizeof(struct vhost_memory), offsetof(struct vhost_memory, regions),
           VHOST_VRING_F_LOG, VHOST_F_LOG_ALL);
    return 0;
}
""")
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    lines = [list(map(int, line.split())) for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()]
    assert lines[0] == [p.VRING_STATE.size, 0, 4]
    # VringAddr packs index, flags, desc, used, avail, log in that order
    assert lines[1] == [p.VRING_ADDR.size, 0, 4, 8, 16, 24, 32]
    # MemoryRegion: gpa, size, user addr, then (vhost-user) mmap_offset where the kernel pads
    assert lines[2] == [p.MEMORY_REGION.size, 0, 8, 16, 24]
    assert lines[3] == [p.MEMORY_HEADER.size, p.MEMORY_HEADER.size, p.VHOST_VRING_F_LOG, p.VHOST_F_LOG_ALL]


# -- header ----------------------------------------------------------------------------------------
def test_header_round_trip():
    raw = p.encode_request(Request.SET_OWNER, need_reply=True)
    hdr = p.decode_header(raw)
    assert (hdr.request, hdr.size, hdr.need_reply, hdr.is_reply, hdr.version) == (3, 0, True, False, 1)
    reply = p.encode_reply(Request.GET_FEATURES, p.encode_u64(7))
    rh = p.decode_reply_header(reply[:12])
    assert (rh.request, rh.flags, rh.size) == (1, 5, 8)
    assert reply[12:] == (7).to_bytes(8, "little")


@pytest.mark.parametrize("raw, why", [
    (b"\x01\x00\x00\x00\x01\x00\x00", "header is 7 bytes"),
    (p.HEADER.pack(1, 0, 0), "protocol version 0"),
    (p.HEADER.pack(1, 2, 0), "protocol version 2"),
    (p.HEADER.pack(1, 1 | p.VHOST_USER_REPLY_MASK, 0), "reply flag set"),
    (p.HEADER.pack(5, 1, p.MAX_PAYLOAD_SIZE + 1), "exceeds"),
    (p.HEADER.pack(5, 1, 0xFFFFFFFF), "exceeds"),
])
def test_bad_headers(raw, why):
    with pytest.raises(ProtocolError, match=why):
        p.decode_header(raw)


def test_reply_header_must_have_exact_flags():
    with pytest.raises(ProtocolError, match="reply flags"):
        p.decode_reply_header(p.HEADER.pack(1, 1, 8))
    with pytest.raises(ProtocolError, match="reply flags"):
        p.decode_reply_header(p.HEADER.pack(1, 0xD, 8))


# -- payloads --------------------------------------------------------------------------------------
def test_vring_state_and_addr_round_trip():
    st = VringState(3, 1024)
    assert VringState.decode(st.encode()) == st
    addr = VringAddr(1, 0, 0x7F0000001000, 0x7F0000003000, 0x7F0000002000, 0)
    raw = addr.encode()
    assert len(raw) == 40
    # the wire order is desc, used, avail (not desc, avail, used)
    assert raw[8:16] == (0x7F0000001000).to_bytes(8, "little")
    assert raw[16:24] == (0x7F0000003000).to_bytes(8, "little")
    assert VringAddr.decode(raw) == addr


@pytest.mark.parametrize("payload", [b"", b"\0" * 7, b"\0" * 9, b"\0" * 16])
def test_vring_state_bad_size(payload):
    with pytest.raises(ProtocolError, match="expected 8"):
        VringState.decode(payload)


@pytest.mark.parametrize("payload", [b"", b"\0" * 39, b"\0" * 41])
def test_vring_addr_bad_size(payload):
    with pytest.raises(ProtocolError, match="expected 40"):
        VringAddr.decode(payload)


def test_vring_file():
    assert VringFile.decode(p.encode_u64(5)) == VringFile(5, True)
    assert VringFile.decode(p.encode_u64(0x105)) == VringFile(5, False)
    assert VringFile.decode(VringFile(255, False).encode()) == VringFile(255, False)
    with pytest.raises(ProtocolError, match="reserved bits"):
        VringFile.decode(p.encode_u64(0x200))
    with pytest.raises(ProtocolError, match="reserved bits"):
        VringFile.decode(p.encode_u64(1 << 63))
    with pytest.raises(ProtocolError, match="expected 8"):
        VringFile.decode(b"\0" * 4)


def test_memory_table_round_trip():
    regions = [MemoryRegion(0, 1 << 20, 0x7F0000000000, 0), MemoryRegion(1 << 32, 1 << 21, 0x7E0000000000, 4096)]
    raw = p.encode_memory_table(regions)
    assert len(raw) == 8 + 32 * 2
    assert p.decode_memory_table(raw) == regions


def test_memory_table_full_struct_accepted():
    regions = [MemoryRegion(0, 4096, 0x1000, 0)]
    raw = p.encode_memory_table(regions) + b"\0" * 32 * 7  # the whole VhostUserMemory struct
    assert p.decode_memory_table(raw) == regions


@pytest.mark.parametrize("payload, why", [
    (b"", "no region count"),
    (b"\0" * 4, "no region count"),
    (p.MEMORY_HEADER.pack(0, 0), "0 regions"),
    (p.MEMORY_HEADER.pack(9, 0) + b"\0" * 32 * 9, "9 regions"),
    (p.MEMORY_HEADER.pack(0xFFFFFFFF, 0), "4294967295 regions"),
    (p.MEMORY_HEADER.pack(2, 0) + b"\0" * 32, "payload of 40 bytes for 2 regions"),
    (p.MEMORY_HEADER.pack(1, 0) + b"\0" * 33, "payload of 41 bytes"),
    (p.MEMORY_HEADER.pack(1, 0) + b"\0" * 32 * 9, "payload of 296 bytes"),
])
def test_memory_table_malformed(payload, why):
    with pytest.raises(ProtocolError, match=why):
        p.decode_memory_table(payload)


def test_config_space():
    cfg = ConfigSpace(0, 40, 0, bytes(range(40)))
    raw = cfg.encode()
    assert len(raw) == 52
    assert ConfigSpace.decode(raw) == cfg
    with pytest.raises(ProtocolError, match="no config header"):
        ConfigSpace.decode(b"\0" * 11)
    with pytest.raises(ProtocolError, match="expected 52"):
        ConfigSpace.decode(raw[:-1])
    with pytest.raises(ProtocolError, match="config size 257"):
        ConfigSpace.decode(p.CONFIG_HEADER.pack(0, 257, 0) + bytes(257))


def test_message_owns_its_fds():
    import os
    r, w = os.pipe()
    msg = p.Message(p.decode_header(p.encode_request(Request.SET_VRING_CALL, p.encode_u64(0))[:12]),
                    p.encode_u64(0), [r, w])
    assert msg.take_fd(0) == r
    msg.close_fds()
    assert msg.fds == [-1, -1]
    with pytest.raises(OSError):
        os.fstat(w)
    os.close(r)
