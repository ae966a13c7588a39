"""Where the device worker's CPU per FUSE request goes, inside a real VM (issue 9 item 2).

Boots our VMM with the virtio-fs device in-process and runs the probe workload (missing-name
stats, one LOOKUP each) between two marks; reports the worker thread's CPU per request (schedstat),
the rest of the VMM's CPU per request (vCPU threads, main thread), and with ``--cprofile`` the top
entries of a cProfile of the worker thread (profiling inflates every call, so the profile says
*where*, the plain run says *how much*).

With ``--parallel K`` the probe runs as K copies at once (the agent's `parallel` op, one guest
kernel thread per vCPU, ``--vcpus``), so several requests are in flight together.

    python bench/fuse_worker_profile.py [--names 20] [--repeat 10] [--cprofile] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.fuse_backends import mark_of, process_tree_cpu_seconds  # noqa: E402
from devices.virtio.fs import worker as worker_mod  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402
from guest.script import render  # noqa: E402
from vmm.qemu import thread_cpu_seconds_by_name  # noqa: E402

TAG = "bench"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=20, help="missing names per probe round")
    p.add_argument("--repeat", type=int, default=10, help="probe rounds")
    p.add_argument("--parallel", type=int, default=0, help="run K probe copies at once")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--cprofile", action="store_true", help="profile the worker thread")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--name", default="fuse_worker_profile", help="result file name")
    p.add_argument("--kernel", default="auto", help="guest kernel (default: the cached project kernel)")
    args = p.parse_args()

    from vmm.control import request
    from vmm.runner import guest_config, run_guest

    # Thread CPU time as the profiler's clock: wall time would count the worker's waits for the
    # GIL and for epoll, which are not what the worker costs the host.
    profile = cProfile.Profile(time.thread_time_ns, 1e-9) if args.cprofile else None
    if profile is not None:
        original = worker_mod.FsWorker._run

        def profiled_run(self: Any) -> None:
            profile.enable()
            try:
                original(self)
            finally:
                profile.disable()
        worker_mod.FsWorker._run = profiled_run  # type: ignore[method-assign]

    probe = f"probe /mnt/{TAG} {args.names} {args.repeat} expect=ENOENT"
    if args.parallel:
        probe = f"parallel {args.parallel} {probe}"
    script = render(["mark m0", "sleep 300", probe, "mark m1", "sleep 300", "exit 0"])
    snaps: dict[str, dict[str, float]] = {}
    missing: list[str] = []
    me = os.getpid()
    with tempfile.TemporaryDirectory() as d:
        share = Path(d, "share")
        share.mkdir()
        ctl = str(Path(d, "ctl.sock"))

        def on_line(line: bytes) -> None:
            name = mark_of(line)
            if name is None:
                return
            worker = thread_cpu_seconds_by_name(me, worker_mod.os_thread_name(TAG))
            if worker is None:
                missing.append(name)
                worker = 0.0
            stats = request(ctl, "stats")["devices"][f"fs:{TAG}"]
            snaps[name] = {"worker_s": worker, "vmm_s": process_tree_cpu_seconds(me) - worker,
                           "requests": stats["requests"],
                           "interrupts": stats["virtio"]["interrupts"],
                           "notifications": stats["virtio"]["notifications"]}

        # sandbox none: the worker thread must be in this process, where its CPU time is read
        # (and profiled); since the jailed child became the default it was not, and the figure
        # silently came out as 0 us per request.
        cfg = guest_config(script, [FsOptions(source=str(share), tag=TAG, sandbox="none")],
                           vcpus=args.vcpus,
                           timeout=1800, kernel=args.kernel)
        result, output = run_guest(cfg, control_path=ctl, on_line=on_line)
        if result.exit_status != 0:
            raise SystemExit(f"guest failed: {result.message}\n{output[-2000:]}")
        if missing:
            raise SystemExit(f"no {worker_mod.os_thread_name(TAG)} thread in this process at marks "
                             f"{missing}: the device must run in-process (sandbox none)")
    a, b = snaps["m0"], snaps["m1"]
    n = b["requests"] - a["requests"]
    step = next(s for s in result.steps if s.op in ("probe", "parallel"))
    out: dict[str, Any] = {
        "command": "python bench/fuse_worker_profile.py " + " ".join(sys.argv[1:]),
        "requests": n,
        "worker_us_per_request": (b["worker_s"] - a["worker_s"]) / n * 1e6,
        "vmm_other_us_per_request": (b["vmm_s"] - a["vmm_s"]) / n * 1e6,
        "interrupts_per_request": (b["interrupts"] - a["interrupts"]) / n,
        "notifications_per_request": (b["notifications"] - a["notifications"]) / n,
        "guest_step": step.raw,
        "cprofile": args.cprofile, "vcpus": args.vcpus, "parallel": args.parallel,
    }
    if profile is not None:
        s = io.StringIO()
        st = pstats.Stats(profile, stream=s)
        st.sort_stats("tottime").print_stats(args.top)
        text = s.getvalue()
        print(text)
        out["profile_top_tottime"] = [line for line in text.splitlines() if line.strip()][:args.top + 12]
    write_result(args.name, out)


if __name__ == "__main__":
    main()
