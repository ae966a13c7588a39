"""Nothing the guest synced is lost (issue 11 item 6), through the real server and passthrough.

The share is ext4 on a loop device (tests/loopfs.py), so "on disk" is observable: data ext4 has
not written back is absent from the image. Each test first shows the data is *not* on disk after
the plain request (WRITE, CREATE), which is what makes the sync request's effect visible; then
that FSYNC, FSYNCDIR and SYNCFS have put it there by the time their reply is out. SYNCFS was
answered ENOSYS before, so a guest's sync(2) never reached the host's disk.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess

import pytest

from fuse import abi
from fuse.abi import Opcode
from guest.script import pattern
from tests.loopfs import blocks_on_disk, can_mount, ext4_on_loop, name_on_disk
from tests.test_passthrough_wire import Wire

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root to mount a loop device")

SIZE = 256 << 10


@pytest.fixture
def disk(tmp_path):
    with ext4_on_loop(tmp_path) as (mnt, image):
        share = mnt / "share"
        share.mkdir()
        os.sync()  # the file system's own creation is on disk; what follows is the test's
        yield share, image


def _create(w: Wire, name: bytes, parent: int = 1) -> tuple[int, int]:
    err, body = w.call(Opcode.CREATE, parent, abi.CREATE_IN.pack(
        flags=os.O_RDWR | os.O_CREAT, mode=0o100644) + name + b"\0")
    assert err == 0
    return abi.ENTRY_OUT.unpack(body).nodeid, abi.OPEN_OUT.unpack(body, abi.ENTRY_OUT.size).fh


def _write(w: Wire, nodeid: int, fh: int, data: bytes) -> None:
    for off in range(0, len(data), 1 << 17):
        piece = data[off:off + (1 << 17)]
        err, body = w.call(Opcode.WRITE, nodeid,
                           abi.WRITE_IN.pack(fh=fh, offset=off, size=len(piece)) + piece)
        assert err == 0 and abi.WRITE_OUT.unpack(body).size == len(piece)


@pytest.mark.parametrize("datasync", [False, True])
def test_fsync_reply_comes_after_the_data_is_on_disk(disk, datasync, wire):
    share, image = disk
    w = wire(share)
    w.init()
    data = pattern(SIZE, seed=11 + datasync)
    nodeid, fh = _create(w, b"f")
    _write(w, nodeid, fh, data)
    assert (share / "f").read_bytes() == data       # on the host file at once...
    assert blocks_on_disk(image, data) == 0          # ...but not written back yet
    flags = abi.FUSE_FSYNC_FDATASYNC if datasync else 0
    assert w.call(Opcode.FSYNC, nodeid, abi.FSYNC_IN.pack(fh=fh, fsync_flags=flags))[0] == 0
    assert blocks_on_disk(image, data) == 1


def test_flush_puts_the_data_on_the_host_file_and_nothing_more(disk, wire):
    """FLUSH is close(): what the guest wrote is on the host file before the reply (a reader
    on the host sees it), and, as for a local close(), nothing is forced to disk."""
    share, image = disk
    w = wire(share)
    w.init()
    data = pattern(SIZE, seed=3)
    nodeid, fh = _create(w, b"f")
    _write(w, nodeid, fh, data)
    assert w.call(Opcode.FLUSH, nodeid, abi.FLUSH_IN.pack(fh=fh))[0] == 0
    assert (share / "f").read_bytes() == data
    assert w.call(Opcode.RELEASE, nodeid, abi.RELEASE_IN.pack(fh=fh))[0] == 0
    assert (share / "f").read_bytes() == data


def test_fsyncdir_puts_a_new_entry_on_disk(disk, wire):
    share, image = disk
    (share / "sub").mkdir()
    os.sync()
    w = wire(share)
    w.init()
    sub = w.lookup(b"sub")[1].nodeid
    name = b"entry-" + secrets.token_hex(8).encode()
    _create(w, name, parent=sub)
    assert not name_on_disk(image, name)
    err, body = w.call(Opcode.OPENDIR, sub, abi.OPEN_IN.pack(flags=os.O_RDONLY))
    dh = abi.OPEN_OUT.unpack(body).fh
    assert w.call(Opcode.FSYNCDIR, sub, abi.FSYNC_IN.pack(fh=dh))[0] == 0
    assert name_on_disk(image, name)


def test_syncfs_puts_everything_written_through_the_share_on_disk(disk, wire):
    share, image = disk
    w = wire(share)
    w.init()
    a, b = pattern(SIZE, seed=21), pattern(SIZE // 2, seed=22)
    na, fa = _create(w, b"a")
    nb, fb = _create(w, b"b")
    _write(w, na, fa, a)
    _write(w, nb, fb, b)
    for n, f in ((na, fa), (nb, fb)):
        assert w.call(Opcode.RELEASE, n, abi.RELEASE_IN.pack(fh=f))[0] == 0
    assert blocks_on_disk(image, a) == 0 and blocks_on_disk(image, b) == 0
    err, _ = w.call(Opcode.SYNCFS, 1, abi.SYNCFS_IN.pack())
    assert err == 0, errno.errorcode.get(-err)
    assert blocks_on_disk(image, a) == 1 and blocks_on_disk(image, b) == 1


def test_syncfs_reaches_a_file_system_mounted_inside_the_share(tmp_path, wire):
    """virtiofsd syncs submounts too: a second ext4 mounted below the share's root, reached by
    the guest, is synced by the same SYNCFS."""
    (tmp_path / "outer").mkdir()
    (tmp_path / "inner").mkdir()
    with ext4_on_loop(tmp_path / "outer") as (outer, _outer_image), \
            ext4_on_loop(tmp_path / "inner") as (inner, inner_image):
        sub = outer / "sub"
        sub.mkdir()
        os.sync()
        subprocess.run(["mount", "--bind", str(inner), str(sub)], check=True)
        try:
            w = wire(outer)
            w.init()
            subid = w.lookup(b"sub")[1].nodeid
            data = pattern(SIZE, seed=31)
            n, f = _create(w, b"deep", parent=subid)
            _write(w, n, f, data)
            assert blocks_on_disk(inner_image, data) == 0
            assert w.call(Opcode.SYNCFS, 1, abi.SYNCFS_IN.pack())[0] == 0
            assert blocks_on_disk(inner_image, data) == 1
            w.call(Opcode.RELEASE, n, abi.RELEASE_IN.pack(fh=f))
            w.fs.destroy()
        finally:
            subprocess.run(["umount", str(sub)], check=False)
