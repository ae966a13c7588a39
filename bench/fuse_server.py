"""Host-side cost of one FUSE request, without a VM: LOOKUP and GETATTR through fuse.Server and the
passthrough filesystem, against the reference of a bare os.stat() of the same host file measured in
the same run (the ratio is the server's overhead per request). Each figure is given in wall time
and in this thread's CPU time (``*_cpu_us``): on a shared machine the wall time also counts the
time other processes held the CPU, the CPU time does not.

    python bench/fuse_server.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402
from devices.virtio.fs.passthrough import PassthroughFs  # noqa: E402
from fuse import abi  # noqa: E402
from fuse.io import BytesReader, BytesWriter  # noqa: E402
from fuse.server import Server  # noqa: E402


def request(opcode: int, unique: int, nodeid: int, body: bytes) -> bytes:
    hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(body), opcode=opcode,
                             unique=unique, nodeid=nodeid, uid=0, gid=0, pid=1)
    return hdr + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as d:
        Path(d, "file").write_bytes(b"x")
        server = Server(PassthroughFs(FsOptions(source=d, tag="bench")))
        init = abi.INIT_IN.pack(major=7, minor=37, max_readahead=1 << 17)
        server.handle(BytesReader(request(abi.FUSE_INIT, 1, 0, init)), BytesWriter(4096))
        lookup = request(abi.FUSE_LOOKUP, 2, 1, b"file\0")
        missing = request(abi.FUSE_LOOKUP, 3, 1, b"missing\0")
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(n):
            os.stat(os.path.join(d, "file"))
        ref = (time.perf_counter() - t0) / n
        ref_cpu = (time.thread_time() - c0) / n
        results, cpu = {}, {}
        for name, req in (("lookup_positive", lookup), ("lookup_missing", missing)):
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n):
                server.handle(BytesReader(req), BytesWriter(4096))
            results[name] = (time.perf_counter() - t0) / n
            cpu[name] = (time.thread_time() - c0) / n
    write_result("fuse_server", {
        "requests": n, "reference_os_stat_us": ref * 1e6,
        **{f"{k}_us": v * 1e6 for k, v in results.items()},
        **{f"{k}_ratio_to_os_stat": v / ref for k, v in results.items()},
        "reference_os_stat_cpu_us": ref_cpu * 1e6,
        **{f"{k}_cpu_us": v * 1e6 for k, v in cpu.items()},
        **{f"{k}_cpu_ratio_to_os_stat": v / ref_cpu for k, v in cpu.items()}})


if __name__ == "__main__":
    main()
