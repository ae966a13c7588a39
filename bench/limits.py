"""Figures for issue 11 item 5: reset latency behind a long request, memory of open listings.

    python bench/limits.py [--runs 5]

* **Reset latency**: the real virtio-fs device (transport, worker thread, server, passthrough)
  on tmpfs is reset (Status=0) while a 512 MiB FALLOCATE or COPY_FILE_RANGE runs. The reference,
  measured in the same run, is the same call made whole, which is how long a reset used to wait
  behind it. The figure is the median reset time and its ratio to the reference; the goal is a
  reset under 50 ms on a quiet machine.
* **Directory memory**: heap (tracemalloc) of 1,000 OPENDIR+READDIR of a 20,000-entry directory
  through the server, per handle, against the reference of one whole listing held in memory
  (what each handle cost when READDIR served a snapshot), and against the share's documented
  ceiling (FsOptions.memory_ceiling).

Results go to bench/results/limits.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import struct
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.virtio.fs import syscalls  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402
from fuse import abi  # noqa: E402
from tests.test_fs_long_ops import SIZE, _create, _reset_while_growing, _start  # noqa: E402
from tests.test_passthrough_wire import Wire  # noqa: E402
from tests.test_virtio_fs import Guest  # noqa: E402

ENTRIES = 20_000
OPENDIRS = 1_000
_DIRENT = struct.Struct("<QqHB")  # linux_dirent64 header


def _whole_call(share: Path, what: str) -> float:
    """The reference: the call made in one piece, as before the split."""
    dst = os.open(share / "ref", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    src = os.open(share / "src", os.O_RDONLY) if what == "copy" else -1
    try:
        t0 = time.perf_counter()
        if what == "fallocate":
            syscalls.fallocate(dst, 0, 0, SIZE)
        else:
            done = 0
            while done < SIZE:
                n = os.copy_file_range(src, dst, SIZE - done, done, done)
                if n <= 0:
                    break
                done += n
        return time.perf_counter() - t0
    finally:
        os.close(dst)
        if src >= 0:
            os.close(src)
        os.unlink(share / "ref")


def _reset_during(share: Path, what: str) -> float:
    g = Guest(FsOptions(source=str(share), tag="bench"))
    try:
        g.up()
        g.init()
        dst_id, dst_fh = _create(g, b"dst")
        if what == "fallocate":
            _start(g, abi.Opcode.FALLOCATE, dst_id,
                   abi.FALLOCATE_IN.pack(fh=dst_fh, offset=0, length=SIZE, mode=0))
        else:
            err, body = g.fuse(abi.Opcode.LOOKUP, 1, b"src\0", abi.ENTRY_OUT.size)
            src_id = abi.ENTRY_OUT.unpack(body).nodeid
            err, body = g.fuse(abi.Opcode.OPEN, src_id, abi.OPEN_IN.pack(flags=os.O_RDONLY),
                               abi.OPEN_OUT.size)
            _start(g, abi.Opcode.COPY_FILE_RANGE, src_id, abi.COPY_FILE_RANGE_IN.pack(
                fh_in=abi.OPEN_OUT.unpack(body).fh, nodeid_out=dst_id, fh_out=dst_fh, len=SIZE))
        took = _reset_while_growing(g, share / "dst")
        if g.dev._stuck is not None:
            raise SystemExit("the worker was left behind: the call was not split")
        return took
    finally:
        g.close()
        os.unlink(share / "dst")


def reset_latency(runs: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="pyvmm-bench-") as d:
        share = Path(d)
        with open(share / "src", "wb") as f:
            f.truncate(SIZE)
        for what in ("fallocate", "copy"):
            whole = statistics.median(_whole_call(share, what) for _ in range(runs))
            reset = statistics.median(_reset_during(share, what) for _ in range(runs))
            out[what] = {"whole_call_ms": round(whole * 1e3, 1),
                         "reset_ms": round(reset * 1e3, 2),
                         "reset_vs_whole_call": round(reset / whole, 3)}
            print(f"{what}: whole 512 MiB call {whole * 1e3:.1f} ms, reset during it "
                  f"{reset * 1e3:.2f} ms", file=sys.stderr)
    return out


def directory_memory() -> dict:
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as d:
        share = Path(d)
        for i in range(ENTRIES):
            (share / f"entry-{i:05d}-{'x' * 20}").touch()
        w = Wire(share)
        w.init()
        gc.collect()
        tracemalloc.start()
        try:
            reference = _snapshot_heap(share)
            gc.collect()
            m0 = tracemalloc.get_traced_memory()[0]
            for _ in range(OPENDIRS):
                err, body = w.call(abi.Opcode.OPENDIR, 1, abi.OPEN_IN.pack())
                fh = abi.OPEN_OUT.unpack(body).fh
                w.call(abi.Opcode.READDIR, 1, abi.READ_IN.pack(fh=fh, size=4096), out=8192)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - m0
        finally:
            tracemalloc.stop()
        per_handle = grown / OPENDIRS
        ceiling = w.fs.options.memory_ceiling
        print(f"{OPENDIRS} open listings: {grown / 2**20:.2f} MiB ({per_handle:.0f} B per "
              f"handle; a whole listing: {reference / 2**20:.2f} MiB)", file=sys.stderr)
        return {"entries": ENTRIES, "open_listings": OPENDIRS,
                "heap_mib": round(grown / 2**20, 2), "per_handle_bytes": round(per_handle),
                "whole_listing_mib": round(reference / 2**20, 2),
                "per_handle_vs_whole_listing": round(per_handle / reference, 5),
                "device_ceiling_mib": round(ceiling / 2**20, 1)}


def _snapshot_heap(share: Path) -> int:
    """Heap of one whole listing as the snapshot READDIR kept it: a list of (ino, type, name)."""
    fd = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
    try:
        gc.collect()
        m0 = tracemalloc.get_traced_memory()[0]
        listing = []
        while raw := syscalls.getdents64_raw(fd, 1 << 16):
            pos = 0
            while pos < len(raw):
                ino, _off, reclen, dtype = _DIRENT.unpack_from(raw, pos)
                listing.append((ino, dtype, raw[pos + 19:pos + reclen].split(b"\0", 1)[0]))
                pos += reclen
        return tracemalloc.get_traced_memory()[0] - m0
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    import logging
    logging.basicConfig(level=logging.ERROR)
    from bench.common import write_result
    write_result("limits", {"reset_latency": reset_latency(args.runs),
                            "directory_memory": directory_memory()})


if __name__ == "__main__":
    main()
