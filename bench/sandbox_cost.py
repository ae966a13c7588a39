"""Host CPU per FUSE request with and without the sandbox, in one run (issue 11 item 1).

Two configurations of our VMM on the same guest script (bench/fuse_backends.py's workloads:
probe = stats of missing names, small = small files written/stat'ed/read/unlinked, io = one file
written and read back), alternated round by round:

    ours-inproc      `sandbox: none`: the device is a worker thread of the VMM (virtio-mmio)
    ours-sandboxed   the default `sandbox: namespace`: a jailed child serves the rings over
                     vhost-user (KVM ioeventfd -> child, child -> irqfd), the VMM keeps the
                     registers

Figures per workload (min / median over rounds): the worker thread's CPU per request (the FUSE
work itself, in either process), and **all host CPU per request**: VMM process + the child's
whole process tree (relay, jailed process: its vhost-user control thread and interpreter
included) -- the cost of the sandbox as the host pays it. Ratios are sandboxed / in-process,
measured in the same run; the issue's budget is 1.10.

    python bench/sandbox_cost.py [--rounds 2] [--files 20] [--size 512K]

JSON in bench/results/sandbox_cost.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench.fuse_backends import (  # noqa: E402
    WORKLOADS,
    Round,
    machine,
    parse_size,
    ratio,
    run_ours,
    script,
    summarize,
)

CONFIGS = ("ours-inproc", "ours-sandboxed")


def total_per_request(rounds: list[Round]) -> dict[str, dict[str, float]]:
    """All host CPU (VMM + server) per request, in us, per workload (min / median)."""
    import statistics

    out = {}
    for seg in (*WORKLOADS, "write", "read"):
        vals = []
        for r in rounds:
            d = r.segment(seg)
            if d.get("requests"):
                # vmm_s excludes the server (worker thread or child tree): add it back
                vals.append((d["vmm_s"] + d["server_s"]) / d["requests"] * 1e6)
        if vals:
            out[seg] = {"min": min(vals), "median": statistics.median(vals), "n": len(vals)}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--files", type=int, default=20, help="files in the small-file workload (20)")
    p.add_argument("--size", type=parse_size, default=512 << 10, help="bytes written and read (512K)")
    p.add_argument("--kernel", type=Path)
    args = p.parse_args(argv)
    command = "python bench/sandbox_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.kernel is None:
        from guest.build import ensure_kernel
        args.kernel = ensure_kernel(progress=lambda m: print(f"guest kernel: {m}", file=sys.stderr))
    text = script(args.size, args.files)
    desc = machine()
    rounds: dict[str, list[Round]] = {c: [] for c in CONFIGS}
    workroot = Path(tempfile.mkdtemp(prefix="pyvmm-sbx-bench-"))
    started_all = time.monotonic()
    try:
        for i in range(args.rounds):
            for config in (CONFIGS if i % 2 == 0 else tuple(reversed(CONFIGS))):
                share = workroot / f"share-{i}-{config}"
                share.mkdir()
                wd = Path(tempfile.mkdtemp(prefix="w", dir=workroot))
                started = time.monotonic()
                rnd, _ = run_ours(config, share, wd, args.kernel, text)
                rounds[config].append(rnd)
                if all(rounds.values()):        # a partial run still leaves its figures
                    report(rounds, args, desc, command, started_all, complete=False)
                d = rnd.segment("small")
                print(f"round {i + 1} {config}: {time.monotonic() - started:.0f} s, small: server "
                      f"{d['server_s'] * 1e3:.1f} ms, vmm {d['vmm_s'] * 1e3:.1f} ms, requests "
                      f"{d['requests']}", file=sys.stderr)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    report(rounds, args, desc, command, started_all, complete=True)


def report(rounds: dict[str, list[Round]], args: argparse.Namespace, desc: dict[str, Any],
           command: str, started_all: float, complete: bool) -> None:
    """Summaries and ratios of the rounds so far, to JSON and stdout."""
    desc = dict(desc, load_after=os.getloadavg())
    summaries = {c: summarize(rs, None, args.size) for c, rs in rounds.items()}
    totals = {c: total_per_request(rs) for c, rs in rounds.items()}
    ratios: dict[str, Any] = {}
    for seg in totals["ours-inproc"]:
        a, b = summaries["ours-sandboxed"][seg], summaries["ours-inproc"][seg]
        ratios[seg] = {
            "host_cpu_us_per_request": ratio(totals["ours-sandboxed"][seg]["median"],
                                             totals["ours-inproc"][seg]["median"]),
            "host_cpu_us_per_request_min": ratio(totals["ours-sandboxed"][seg]["min"],
                                                 totals["ours-inproc"][seg]["min"]),
            # the server: the worker thread in-process, the child's whole tree sandboxed
            "server_us_per_request": ratio(a["server_us_per_request"]["median"],
                                           b["server_us_per_request"]["median"]),
            "worker_us_per_request": ratio(a["worker_us_per_request"]["median"],
                                           b["worker_us_per_request"]["median"]),
            "requests": ratio(a["requests"]["median"], b["requests"]["median"]),
        }
    result = {"machine": desc, "rounds": args.rounds, "complete": complete,
              "rounds_done": {c: len(rs) for c, rs in rounds.items()}, "files": args.files, "size": args.size,
              "wall_s": round(time.monotonic() - started_all), "command": command,
              "host_cpu_us_per_request": totals, "results": summaries,
              "ratios_sandboxed_over_inproc": ratios}
    write_result("sandbox_cost", result)
    print(f"{'workload':10} {'inproc us/req':>14} {'sandboxed us/req':>17} {'ratio':>7} "
          f"{'worker ratio':>13}")
    for seg, r in ratios.items():
        print(f"{seg:10} {totals['ours-inproc'][seg]['median']:14.1f} "
              f"{totals['ours-sandboxed'][seg]['median']:17.1f} "
              f"{r['host_cpu_us_per_request'] or 0:7.3f} {r['worker_us_per_request'] or 0:13.3f}")


if __name__ == "__main__":
    main()
