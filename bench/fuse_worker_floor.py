"""The floor of a Python request loop in a real VM, against C virtiofsd (issue 9 item 2).

Issue 9 asks for a device worker within 1.5x of C virtiofsd's host CPU per FUSE request. Before
cutting more out of our layers, this measures what no Python worker can go below here: the device
worker thread with its request-queue loop replaced by the least Python that can answer the probe's
requests (a missing-name LOOKUP in the share's root):

    wake in epoll, read the eventfd, read the avail index, walk the descriptors, unpack the
    in-header, one fstatat of the name, pack a 16-byte ENOENT out-header, publish the used entry,
    write the irqfd

-- about twenty lines and no call into our server, passthrough, chain reader/writer or metrics.
Anything else the guest sends (INIT, GETATTR of the root, ...) still goes through the real
device. That loop checks nothing a hostile guest could send it: it exists only here, to measure.

Three configurations of the same boot, alternated round by round, one guest script (the probe:
NAMES missing names x REPEAT rounds, one LOOKUP each, between two marks):

* ``ours``: our VMM, the virtio-fs device in-process as shipped;
* ``floor``: our VMM, the same device with the minimal loop above;
* ``virtiofsd``: our VMM as vhost-user front-end of QEMU 7.2's C virtiofsd (only the back-end
  differs; every thread of the virtiofsd process tree is counted).

Server CPU (schedstat of the worker thread / of the back-end's process tree) between the marks is
divided by the probe's LOOKUPs (NAMES x REPEAT; the one GETATTR of the root per second that the
guest sends whoever serves it is in all three alike). The ratios against virtiofsd say whether
the issue's target (1.5x) is reachable by a worker written in Python on this machine.

    python bench/fuse_worker_floor.py [--rounds 3] [--probe 20x10]
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.fuse_backends import TAG, run_ours  # noqa: E402
from devices.virtio import queue as queue_mod  # noqa: E402
from devices.virtio.fs import worker as worker_mod  # noqa: E402
from guest.script import render  # noqa: E402

CONFIGS = ("ours", "floor", "virtiofsd")
_U16 = struct.Struct("<H")
_DESC = struct.Struct("<QIHH")
_IN_HEADER = struct.Struct("<IIQQ")   # len, opcode, unique, nodeid (the rest is not needed)
_OUT_HEADER = struct.Struct("<IiQ")   # len, error, unique
_LOOKUP = 1
_ROOT = 1
_REQUEST_QUEUE = 1                    # queue 0 is hiprio (FORGET, INTERRUPT)
_F_NEXT, _F_INDIRECT = 1, 4


class MinimalLoop:
    """Replaces FsWorker._process_queue for the request queue while installed (a context
    manager); counts the LOOKUPs it answered itself."""

    def __init__(self, share: Path) -> None:
        self.share = share
        self.answered = 0
        self._root = -1
        self._original = worker_mod.FsWorker._process_queue

    def __enter__(self) -> MinimalLoop:
        self._root = os.open(self.share, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        loop = self

        def process_queue(worker: Any, i: int) -> None:
            if i != _REQUEST_QUEUE:
                return loop._original(worker, i)
            return loop.drain(worker, i)
        worker_mod.FsWorker._process_queue = process_queue  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        worker_mod.FsWorker._process_queue = self._original  # type: ignore[method-assign]
        os.close(self._root)

    def drain(self, worker: Any, i: int) -> None:
        q = worker.queues[i]
        avail, used, desc, size, view = q._avail, q._used, q._desc, q.size, q.memory.view
        returned = 0
        while True:
            nxt = q.next_avail
            if (_U16.unpack_from(avail, 2)[0] - nxt) & 0xFFFF == 0:
                _U16.pack_into(used, q._avail_event_off, nxt)   # EVENT_IDX re-arm, as Queue.pop
                queue_mod._full_fence()
                if (_U16.unpack_from(avail, 2)[0] - nxt) & 0xFFFF == 0:
                    break
            head = _U16.unpack_from(avail, 4 + 2 * (nxt % size))[0]
            table, index, bufs = desc, head, []
            while True:
                addr, length, flags, following = _DESC.unpack_from(table, index * 16)
                if flags & _F_INDIRECT:
                    table, index = view(addr, length), 0
                    continue
                bufs.append((addr, length))
                if not flags & _F_NEXT:
                    break
                index = following
            _, opcode, unique, nodeid = _IN_HEADER.unpack_from(view(*bufs[0]))
            if opcode != _LOOKUP or nodeid != _ROOT or len(bufs) != 4:
                # not the probe's request: the real device serves it (INIT, GETATTR, ...)
                chain = q.pop()
                q.add_used(chain.head, worker._handle(i, chain))
            else:
                q.next_avail = (nxt + 1) & 0xFFFF
                name = bytes(view(*bufs[1])).rstrip(b"\0")
                error = -errno.EIO
                try:
                    os.stat(name, dir_fd=self._root, follow_symlinks=False)
                except FileNotFoundError:
                    error = -errno.ENOENT
                _OUT_HEADER.pack_into(view(bufs[2][0], 16), 0, 16, error, unique)
                q.add_used(head, 16)
                self.answered += 1
            worker.counters.chains += 1
            returned += 1
        if returned:
            worker._notify(i, q)


def probe_script(names: int, repeat: int) -> str:
    return render(["mark m0", "sleep 300", f"probe /mnt/{TAG} {names} {repeat} expect=ENOENT",
                   "mark m1", "sleep 300", "exit 0"])


def run_one(config: str, workroot: Path, kernel: Path, text: str, lookups: int) -> dict[str, Any]:
    share = Path(tempfile.mkdtemp(prefix="share", dir=workroot))
    wd = Path(tempfile.mkdtemp(prefix="w", dir=workroot))
    try:
        if config == "floor":
            with MinimalLoop(share) as loop:
                rnd, _ = run_ours("ours-inproc", share, wd, kernel, text)
            if loop.answered != lookups:
                raise SystemExit(f"floor: the minimal loop answered {loop.answered} LOOKUPs, the "
                                 f"probe sends {lookups}: the figure would not be the floor's")
        else:
            rnd, _ = run_ours("ours-inproc" if config == "ours" else "virtiofsd", share, wd,
                              kernel, text)
    finally:
        shutil.rmtree(share, ignore_errors=True)
        shutil.rmtree(wd, ignore_errors=True)
    seg: dict[str, Any] = rnd.segment("probe")
    stat_step = next(s for s in rnd.steps if s.op == "probe")
    return {"server_us_per_lookup": seg["server_s"] / lookups * 1e6,
            "vmm_other_us_per_lookup": seg["vmm_s"] / lookups * 1e6,
            "server_requests": seg.get("requests"), "guest_step": stat_step.raw}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probe", default="20x10", help="missing names x rounds (20x10)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--kernel", type=Path, help="guest kernel (default: the cached project kernel)")
    args = p.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if set(configs) - set(CONFIGS):
        raise SystemExit(f"configs are a subset of {', '.join(CONFIGS)}")
    if args.kernel is None:
        from guest.build import ensure_kernel
        args.kernel = ensure_kernel(progress=lambda m: print(f"guest kernel: {m}", file=sys.stderr))
    names, repeat = (int(x) for x in args.probe.split("x"))
    lookups = names * repeat
    text = probe_script(names, repeat)
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    workroot = Path(tempfile.mkdtemp(prefix="pyvmm-floor-"))
    try:
        for r in range(args.rounds):
            for config in (configs if r % 2 == 0 else configs[::-1]):
                started = time.monotonic()
                one = run_one(config, workroot, args.kernel, text, lookups)
                runs[config].append(one)
                print(f"round {r + 1} {config}: {one['server_us_per_lookup']:.0f} us server CPU "
                      f"per LOOKUP ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)

    def fig(config: str) -> dict[str, float]:
        values = [x["server_us_per_lookup"] for x in runs[config]]
        return {"min": round(min(values), 1), "median": round(statistics.median(values), 1)}
    summary = {c: fig(c) for c in configs}
    ratios: dict[str, Any] = {}
    if "virtiofsd" in summary:
        ref = summary["virtiofsd"]
        for c in configs:
            if c != "virtiofsd":
                ratios[f"{c}/virtiofsd"] = {k: round(summary[c][k] / ref[k], 2) for k in ref}
    if "ours" in summary and "floor" in summary:
        ratios["floor/ours"] = {k: round(summary["floor"][k] / summary["ours"][k], 2)
                                for k in summary["ours"]}
    write_result("fuse_worker_floor", {
        "command": "python bench/fuse_worker_floor.py " + " ".join(sys.argv[1:]),
        "probe": {"names": names, "repeat": repeat, "lookups": lookups},
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "server_us_per_lookup": summary, "ratios": ratios, "runs": runs})


if __name__ == "__main__":
    main()
