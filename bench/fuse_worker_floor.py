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

Four configurations of the same boot, alternated round by round, one guest script (the probe:
NAMES missing names x REPEAT rounds, one LOOKUP each, between two marks):

* ``ours``: our VMM, the virtio-fs device in-process as shipped;
* ``floor``: our VMM, the same device with the minimal loop above;
* ``native``: the same loop in C (native_floor.c, built here with cc), the waiting included: the
  worker thread stays in it, without the GIL, and returns to Python only for the requests it does
  not answer -- what a native request path inside our VMM's process would cost;
* ``virtiofsd``: our VMM as vhost-user front-end of QEMU 7.2's C virtiofsd (only the back-end
  differs; every thread of the virtiofsd process tree is counted).

Server CPU (schedstat of the worker thread / of the back-end's process tree) between the marks is
divided by the probe's LOOKUPs (NAMES x REPEAT; the one GETATTR of the root per second that the
guest sends whoever serves it is in all of them alike). The ratios against virtiofsd say whether
the issue's target (1.5x) is reachable by a worker written in Python on this machine, and what
native code in the same place would buy.

    python bench/fuse_worker_floor.py [--rounds 5] [--probe 20x10] [--configs ours,floor,native,virtiofsd]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import shutil
import statistics
import struct
import subprocess
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

CONFIGS = ("ours", "floor", "native", "virtiofsd")
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


class _NativeState(ctypes.Structure):
    """struct floor_state of native_floor.c."""

    _fields_ = [("desc", ctypes.c_void_p), ("avail", ctypes.c_void_p), ("used", ctypes.c_void_p),
                ("region_host", ctypes.c_void_p * 8), ("region_gpa", ctypes.c_uint64 * 8),
                ("region_size", ctypes.c_uint64 * 8), ("regions", ctypes.c_uint32),
                ("size", ctypes.c_uint32), ("kick_fd", ctypes.c_int32), ("stop_fd", ctypes.c_int32),
                ("irq_fd", ctypes.c_int32), ("root_fd", ctypes.c_int32),
                ("next_avail", ctypes.c_uint32), ("next_used", ctypes.c_uint32),
                ("signalled", ctypes.c_uint32), ("event_idx", ctypes.c_uint32),
                ("answered", ctypes.c_uint64)]


def _address(view: memoryview) -> int:
    # the temporary ctypes object (and its buffer export) is gone at once: Queue.close() can
    # still release the view
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class NativeLoop(MinimalLoop):
    """MinimalLoop's work in C (native_floor.c), the waiting included: the worker thread enters
    floor_serve() through ctypes, without the GIL, and comes back to Python only for a request
    the loop does not answer (INIT, GETATTR...) or to stop. The interrupt is the irqfd alone, so
    the device is marked as one whose rings are signalled directly (InterruptStatus then always
    shows VRING, as for a vhost-user back-end; see devices/virtio/mmio.py)."""

    def __init__(self, share: Path, workdir: Path) -> None:
        self._finished = 0                        # answered by floor_serve() calls that returned
        self._live: _NativeState | None = None    # the state of the call running now
        super().__init__(share)
        so = workdir / "native_floor.so"
        subprocess.run(["cc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(so),
                        str(Path(__file__).with_name("native_floor.c"))], check=True)
        self._lib = ctypes.CDLL(str(so))
        self._lib.floor_serve.argtypes = [ctypes.POINTER(_NativeState)]
        self._lib.floor_serve.restype = ctypes.c_int

    @property
    def answered(self) -> int:
        """Answered so far, those of a floor_serve() still running included."""
        return self._finished + (self._live.answered if self._live is not None else 0)

    @answered.setter
    def answered(self, value: int) -> None:     # MinimalLoop.__init__ sets 0
        self._finished = value

    def __enter__(self) -> NativeLoop:
        super().__enter__()
        from devices.virtio.fs.device import FsDevice
        self._signals = FsDevice.signals_rings_directly
        FsDevice.signals_rings_directly = True
        return self

    def __exit__(self, *exc: object) -> None:
        from devices.virtio.fs.device import FsDevice
        FsDevice.signals_rings_directly = self._signals
        super().__exit__(*exc)

    def drain(self, worker: Any, i: int) -> None:
        q = worker.queues[i]
        st = _NativeState(desc=_address(q._desc), avail=_address(q._avail),
                          used=_address(q._used), size=q.size, kick_fd=worker.queue_events[i],
                          stop_fd=worker._stop_fd, irq_fd=worker.interrupt.irq_fd,
                          root_fd=self._root, event_idx=int(q.event_idx))
        regions = q.memory.regions
        if len(regions) > len(st.region_host):
            raise RuntimeError(f"{len(regions)} guest memory regions: native_floor.c takes 8")
        for n, r in enumerate(regions):
            st.region_host[n], st.region_gpa[n], st.region_size[n] = r.host_addr, r.gpa, r.size
        st.regions = len(regions)
        self._live = st
        try:
            while not worker._stopping:
                st.next_avail, st.next_used = q.next_avail, q.next_used
                st.signalled = q._signalled_used
                before = st.answered
                stay = self._lib.floor_serve(ctypes.byref(st))
                q.next_avail, q.next_used = st.next_avail, st.next_used
                q._signalled_used = st.signalled
                worker.counters.chains += st.answered - before
                if not stay:
                    return
                self._original(worker, i)     # the requests the loop left to the Python device
        finally:
            self._live = None
            self._finished += st.answered


def probe_script(names: int, repeat: int) -> str:
    return render(["mark m0", "sleep 300", f"probe /mnt/{TAG} {names} {repeat} expect=ENOENT",
                   "mark m1", "sleep 300", "exit 0"])


def run_one(config: str, workroot: Path, kernel: Path, text: str, lookups: int) -> dict[str, Any]:
    share = Path(tempfile.mkdtemp(prefix="share", dir=workroot))
    wd = Path(tempfile.mkdtemp(prefix="w", dir=workroot))
    try:
        if config in ("floor", "native"):
            with (MinimalLoop(share) if config == "floor" else NativeLoop(share, wd)) as loop:
                rnd, _ = run_ours("ours-inproc", share, wd, kernel, text)
            if loop.answered != lookups:
                raise SystemExit(f"{config}: the minimal loop answered {loop.answered} LOOKUPs, the "
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
    p.add_argument("--rounds", type=int, default=5)
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
    # every configuration against C virtiofsd, and the floor against the device as shipped
    pairs = [(c, "virtiofsd") for c in configs if c != "virtiofsd"] + [("floor", "ours")]
    ratios = {f"{a}/{b}": {k: round(summary[a][k] / summary[b][k], 2) for k in summary[b]}
              for a, b in pairs if a in summary and b in summary}
    write_result("fuse_worker_floor", {
        "command": "python bench/fuse_worker_floor.py " + " ".join(sys.argv[1:]),
        "probe": {"names": names, "repeat": repeat, "lookups": lookups},
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "server_us_per_lookup": summary, "ratios": ratios, "runs": runs})


if __name__ == "__main__":
    main()
