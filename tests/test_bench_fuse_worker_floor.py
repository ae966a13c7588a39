"""bench/fuse_worker_floor.py's minimal loop, driven like Linux drives the device, without a guest.

The benchmark's conclusion rests on the loop doing the probe's work and nothing less: it must
answer a missing-name LOOKUP itself, with the reply the real device would give, and hand every
other request to the real device (else the guest would not even mount).
"""

from __future__ import annotations

import errno

import pytest

from bench.fuse_worker_floor import MinimalLoop, NativeLoop
from devices.virtio.fs import worker as worker_mod
from devices.virtio.fs.options import FsOptions
from fuse import abi
from tests.test_virtio_fs import Guest

# Linux's virtio_fs: in-header | name, then out-header | entry_out, each its own descriptor
SPLIT_ENTRY = [abi.OUT_HEADER.size, abi.ENTRY_OUT.size]


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_the_minimal_loop_answers_missing_names_and_hands_on_the_rest(tmp_path, native):
    share = tmp_path / "share"
    share.mkdir()
    (share / "present").write_text("x")
    original = worker_mod.FsWorker._process_queue
    with (NativeLoop(share, tmp_path) if native else MinimalLoop(share)) as loop:
        g = Guest(FsOptions(source=str(share), tag="floor", sandbox="none"))
        try:
            g.up()
            g.init()                                             # the real device's INIT
            assert loop.answered == 0
            for _ in range(3):
                err, _ = g.fuse(abi.Opcode.LOOKUP, 1, b"missing\0", abi.ENTRY_OUT.size,
                                out_split=SPLIT_ENTRY)
                assert err == errno.ENOENT                       # what the device answers
            assert loop.answered == 3
            err, body = g.fuse(abi.Opcode.GETATTR, 1, abi.GETATTR_IN.pack(getattr_flags=0, fh=0),
                               abi.ATTR_OUT.size)
            assert err == 0 and abi.ATTR_OUT.unpack(body).attr.ino == share.stat().st_ino
            assert loop.answered == 3                            # GETATTR went to the server
        finally:
            g.close()
    assert worker_mod.FsWorker._process_queue is original        # nothing left patched
