"""The virtio-fs worker's CPU per request, hot and cold, without a VM (issue 9 item 2).

Inside a real VM one request reaches the worker every few milliseconds, so it runs with cold
caches and branch predictors, and its cost is set by how many Python calls, allocations and
syscalls a request takes, not by what a hot loop shows. This drives the real device (FsDevice
behind the real MmioTransport, its worker thread, the real Queue over real guest memory) from a
fake driver the way Linux does: publish one missing-name LOOKUP, notify the queue's eventfd (what
KVM's ioeventfd does), wait for the interrupt on the irqfd, read and ACK InterruptStatus.

    hot   the next request right after the reply
    cold  between two requests, 32 MiB of memory are copied (evicting the worker's data and code
          from the caches) and the driver sleeps 2 ms (the worker goes back to sleep in epoll)

The figure is the worker thread's CPU time (schedstat) per request, min and median over rounds;
the reference measured in the same run is the CPU time of a bare os.stat() of a missing name, hot
(the syscall the request ends in). The machine is shared, so the CPU figures are noisy; the count of Python
function calls (and calls into C) the worker thread makes per request, taken in a separate pass
with a profile hook, is exact and says what a change removed.

    python bench/fuse_worker_cold.py [--requests 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from devices.memory import GuestMemory  # noqa: E402
from devices.virtio.fs.device import FsDevice  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402
from devices.virtio.mmio import MmioTransport  # noqa: E402
from fuse import abi  # noqa: E402
from tests.fakes import FakeDriverQueue, MmioDriver  # noqa: E402

MEM = 64 << 20
QSIZE = 128
POLLUTE = 32 << 20


class CallCounter:
    """A threading.setprofile hook counting Python and C function calls in the worker thread."""

    def __init__(self) -> None:
        self.calls = 0
        self.c_calls = 0

    def __call__(self, frame, event: str, arg) -> None:
        if threading.current_thread().name.startswith("virtio-fs:"):
            if event == "call":
                self.calls += 1
            elif event == "c_call":
                self.c_calls += 1


class Driver:
    """The guest side: one request queue, LOOKUPs of missing names."""

    def __init__(self, share: str) -> None:
        self.mem = GuestMemory.from_ranges([(0, MEM)])
        self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dev = FsDevice(FsOptions(source=share, tag="cold"))
        self.t = MmioTransport(self.dev, self.mem, self.irq)
        self.mmio = MmioDriver(self.t)
        self.queues = [FakeDriverQueue(self.mem, QSIZE, 0x10000 * (i + 1), (4 << 20) * (i + 1))
                       for i in range(len(self.dev.queue_max_sizes))]
        self.mmio.bring_up(queues=self.queues)
        self.unique = 0
        q = self.queues[1]
        # One set of buffers, reused by every request (as a driver's slab would be).
        self.hdr_gpa = q.alloc(abi.IN_HEADER.size)
        self.name_gpa = q.alloc(b"missing-name\0")
        self.out_gpa = q.alloc(abi.OUT_HEADER.size + abi.ENTRY_OUT.size)
        self.request(abi.Opcode.INIT, 0, abi.INIT_IN.pack(major=7, minor=37, max_readahead=1 << 17))

    def request(self, opcode: int, nodeid: int, args: bytes) -> None:
        q = self.queues[1]
        self.unique += 1
        hdr = abi.IN_HEADER.pack(len=abi.IN_HEADER.size + len(args), opcode=opcode,
                                 unique=self.unique, nodeid=nodeid, uid=0, gid=0, pid=1)
        self.mem.write(self.hdr_gpa, hdr)
        self.mem.write(self.name_gpa, args)
        want = (q.used_idx() + 1) & 0xFFFF
        q.set_used_event(q.used_idx())
        head = q._alloc_desc_index()
        mid = q._alloc_desc_index()
        last = q._alloc_desc_index()
        q.write_desc(q.desc, head, self.hdr_gpa, abi.IN_HEADER.size, 1, mid)
        q.write_desc(q.desc, mid, self.name_gpa, len(args), 1, last)
        q.write_desc(q.desc, last, self.out_gpa, abi.OUT_HEADER.size + abi.ENTRY_OUT.size, 2, 0)
        q.publish(head)
        os.eventfd_write(self.t.queue_events[1], 1)  # what KVM's ioeventfd does on QueueNotify
        while q.used_idx() != want:
            r, _, _ = select.select([self.irq], [], [], 30)
            if not r:
                raise SystemExit("no interrupt within 30 s")
            os.eventfd_read(self.irq)
            self.mmio.w(0x64, self.mmio.r(0x60))

    def worker_cpu_ns(self) -> int:
        tid = self.dev.worker_thread.native_id
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])

    def close(self) -> None:
        self.t.close()
        os.close(self.irq)


def run(driver: Driver, n: int, cold: bool) -> float:
    """Worker CPU us per missing-name LOOKUP over n requests."""
    src = bytearray(POLLUTE)
    dst = bytearray(POLLUTE)
    lookup = b"missing-name\0"
    total = 0
    for _ in range(n):
        if cold:
            dst[:] = src
            time.sleep(0.002)
        before = driver.worker_cpu_ns()
        driver.request(abi.Opcode.LOOKUP, 1, lookup)
        total += driver.worker_cpu_ns() - before
    return total / n / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default="fuse_worker_cold")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        counter = CallCounter()
        threading.setprofile(counter)  # the worker thread starts with the hook (DRIVER_OK)
        try:
            counted = Driver(d)
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]
        try:
            run(counted, 10, cold=False)  # warm up the inode table, the caches of the server
            counter.calls = counter.c_calls = 0
            run(counted, args.requests, cold=False)
            calls = counter.calls / args.requests
            c_calls = counter.c_calls / args.requests
        finally:
            counted.close()
        driver = Driver(d)
        try:
            hot, cold = [], []
            for _ in range(args.rounds):
                hot.append(run(driver, args.requests, cold=False))
                cold.append(run(driver, args.requests, cold=True))
            t0 = time.thread_time()  # CPU time, like the worker's figures
            for _ in range(args.requests):
                try:
                    os.stat(os.path.join(d, "missing-name"))
                except FileNotFoundError:
                    pass
            ref = (time.thread_time() - t0) / args.requests * 1e6
        finally:
            driver.close()

    def spread(v: list[float]) -> dict:
        return {"min": min(v), "median": statistics.median(v), "all": v}
    write_result(args.name, {
        "command": "python bench/fuse_worker_cold.py " + " ".join(sys.argv[1:]),
        "requests": args.requests, "rounds": args.rounds,
        "python_calls_per_lookup": calls, "c_calls_per_lookup": c_calls,
        "hot_worker_us_per_lookup": spread(hot), "cold_worker_us_per_lookup": spread(cold),
        "reference_os_stat_missing_us": ref,
        "cold_ratio_to_os_stat": statistics.median(cold) / ref,
        "hot_ratio_to_os_stat": statistics.median(hot) / ref})


if __name__ == "__main__":
    main()
