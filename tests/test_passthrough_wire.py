"""PassthroughFs behind the real fuse.server.Server: what the guest sees on the wire.

crosvm's lookup_negative_cache only checks ``inode == 0``; here the negative entry's
entry_valid/attr_valid are checked in the encoded fuse_entry_out, and READDIRPLUS lookup
counts are checked to balance when the reply buffer cuts the listing short.
"""

import errno
import os
import struct

import pytest

from devices.virtio.fs.options import FsOptions
from devices.virtio.fs.passthrough import PassthroughFs
from fuse import abi
from fuse.abi import Opcode
from fuse.io import BytesReader, BytesWriter
from fuse.server import Server

HDR = abi.OUT_HEADER.size


class Wire:
    def __init__(self, share, **kw):
        self.fs = PassthroughFs(FsOptions(source=str(share), tag="t", **kw))
        self.server = Server(self.fs, max_write=self.fs.options.max_write)
        self.unique = 0

    def call(self, opcode, nodeid=1, body=b"", out=1 << 16):
        self.unique += 1
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(body), opcode=int(opcode),
                                 unique=self.unique, nodeid=nodeid, uid=0, gid=0, pid=1)
        w = BytesWriter(out)
        n = self.server.handle(BytesReader(hdr + body), w)
        data = w.data[:n]
        if n == 0:
            return None, b""
        oh = abi.OUT_HEADER.unpack(data)
        assert oh.len == n and oh.unique == self.unique
        return oh.error, data[HDR:]

    def init(self, flags=0xFFFFFFFF):
        err, body = self.call(Opcode.INIT, 0, abi.INIT_IN.pack(
            major=7, minor=37, max_readahead=1 << 17, flags=flags))
        assert err == 0
        return abi.INIT_OUT.unpack(body)

    def lookup(self, name, parent=1):
        err, body = self.call(Opcode.LOOKUP, parent, name + b"\0")
        return err, (abi.ENTRY_OUT.unpack(body) if err == 0 else None)


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.mark.parametrize("neg,secs,nsec", [(5, 5, 0), (2.5, 2, 500_000_000)])
def test_negative_entry_on_the_wire(share, neg, secs, nsec):
    w = Wire(share, negative_timeout=neg, timeout=7)
    w.init()
    err, e = w.lookup(b"missing")
    assert err == 0
    assert e.nodeid == 0 and e.entry_valid == secs and e.entry_valid_nsec == nsec
    assert e.attr_valid == 0 and e.attr_valid_nsec == 0
    assert e.attr == abi.ATTR.zero()
    (share / "there").write_bytes(b"abc")
    err, e = w.lookup(b"there")
    assert err == 0 and e.nodeid >= 2 and e.entry_valid == 7 and e.attr_valid == 7
    assert e.attr.size == 3 and e.attr.ino == os.stat(share / "there").st_ino


def test_enoent_without_negative_timeout(share):
    w = Wire(share)
    w.init()
    err, _ = w.lookup(b"missing")
    assert err == -errno.ENOENT


def test_cache_never_zero_timeouts_on_the_wire(share):
    (share / "f").write_bytes(b"x")
    w = Wire(share, cache="never", timeout=30, negative_timeout=4)
    w.init()
    err, e = w.lookup(b"f")
    assert err == 0 and e.entry_valid == 0 and e.attr_valid == 0
    err, e = w.lookup(b"g")
    assert err == 0 and e.nodeid == 0 and e.entry_valid == 4
    err, body = w.call(Opcode.OPEN, 2, abi.OPEN_IN.pack(flags=os.O_RDONLY))
    assert err == 0 and abi.OPEN_OUT.unpack(body).open_flags & abi.FOPEN_DIRECT_IO


def test_dotdot_and_slash_never_reach_outside(share):
    (share.parent / "outside").write_bytes(b"secret")
    w = Wire(share, negative_timeout=5)
    w.init()
    for name in (b"..", b".", b"../outside", b"a/b"):
        err, e = w.lookup(name)
        assert err != 0 or e.nodeid == 0, name
        assert err == -errno.EINVAL, name  # the server and the passthrough agree (fuse.limits)


def test_writeback_flag_negotiation(share):
    plain = Wire(share).init()
    assert plain.flags & abi.FUSE_DO_READDIRPLUS
    assert not plain.flags & abi.FUSE_WRITEBACK_CACHE
    wb = Wire(share, writeback=True).init()
    assert wb.flags & abi.FUSE_WRITEBACK_CACHE
    # never more than the guest offers: the session masks, not the filesystem
    wb = Wire(share, writeback=True).init(flags=0xFFFFFFFF & ~abi.FUSE_WRITEBACK_CACHE)
    assert not wb.flags & abi.FUSE_WRITEBACK_CACHE and wb.flags & abi.FUSE_DO_READDIRPLUS
    assert Wire(share, writeback=True).init(flags=0).flags == 0


def test_read_write_roundtrip(share):
    (share / "f").write_bytes(b"hello world")
    w = Wire(share)
    w.init()
    _, e = w.lookup(b"f")
    err, body = w.call(Opcode.OPEN, e.nodeid, abi.OPEN_IN.pack(flags=os.O_RDWR))
    fh = abi.OPEN_OUT.unpack(body).fh
    err, body = w.call(Opcode.READ, e.nodeid, abi.READ_IN.pack(fh=fh, offset=6, size=100))
    assert err == 0 and body == b"world"
    data = b"WORLD"
    err, body = w.call(Opcode.WRITE, e.nodeid,
                       abi.WRITE_IN.pack(fh=fh, offset=6, size=len(data)) + data)
    assert err == 0 and abi.WRITE_OUT.unpack(body).size == 5
    assert (share / "f").read_bytes() == b"hello WORLD"
    err, _ = w.call(Opcode.RELEASE, e.nodeid, abi.RELEASE_IN.pack(fh=fh))
    assert err == 0 and w.fs.handle_count() == 0


def test_readdirplus_partial_reply_keeps_lookup_counts_balanced(share):
    names = [f"entry{i:02d}".encode() for i in range(20)]
    for n in names:
        (share / n.decode()).write_bytes(b"")
    w = Wire(share)
    w.init()
    err, body = w.call(Opcode.OPENDIR, 1, abi.OPEN_IN.pack(flags=os.O_RDONLY))
    fh = abi.OPEN_OUT.unpack(body).fh
    offset, seen, sent_nodeids = 0, [], []
    while True:
        err, body = w.call(Opcode.READDIRPLUS, 1, abi.READ_IN.pack(fh=fh, offset=offset,
                                                                   size=600))
        assert err == 0
        if not body:
            break
        pos = 0
        while pos < len(body):
            ent = abi.ENTRY_OUT.unpack(body, pos)
            d = abi.DIRENT.unpack(body, pos + abi.ENTRY_OUT.size)
            name = body[pos + abi.FUSE_NAME_OFFSET_DIRENTPLUS:
                        pos + abi.FUSE_NAME_OFFSET_DIRENTPLUS + d.namelen]
            seen.append(name)
            if ent.nodeid:
                sent_nodeids.append(ent.nodeid)
            offset = d.off
            pos += abi.direntplus_size(d.namelen)
    assert sorted(seen) == sorted(names + [b".", b".."])
    # Every entry the guest received accounts for exactly one lookup; unsent ones were
    # forgotten by the server, so the table holds exactly the sent nodes (plus the root).
    assert len(set(sent_nodeids)) == len(names)
    assert all(w.fs.lookup_count(n) == 1 for n in sent_nodeids)
    assert w.fs.inode_count() == len(names) + 1
    forgets = struct.pack("<II", len(sent_nodeids), 0) + b"".join(
        abi.FORGET_ONE.pack(nodeid=n, nlookup=1) for n in sent_nodeids)
    err, _ = w.call(Opcode.BATCH_FORGET, 0, forgets)
    assert err is None and w.fs.inode_count() == 1
