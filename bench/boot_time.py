"""Boot time: VMM start to the agent's first line and to its exit line, over several boots.

Reference measured in the same run: the guest kernel's own clock at the agent's start (uptime_ns in
the agent's start line). The ratio host_wall / guest_clock shows how much of the wall time is the
VMM and KVM exits rather than the guest's own boot work.

    python bench/boot_time.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import boot, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    runs = []
    for _ in range(args.runs):
        r = boot("exit 0\n")
        start = r.console.parser.start
        guest_s = int(start.extra.get("uptime_ns", 0)) / 1e9 if start else 0.0
        runs.append({"to_agent_s": r.timings["to_agent_s"], "to_exit_s": r.timings["to_exit_line_s"],
                     "total_s": r.timings["total_s"], "guest_uptime_at_agent_s": guest_s,
                     "vcpu_exits": r.timings["exits"]})
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    write_result("boot_time", {
        "runs": runs, "median": med,
        "ratio_wall_to_guest_clock": med["to_agent_s"] / med["guest_uptime_at_agent_s"]
        if med["guest_uptime_at_agent_s"] else None})


if __name__ == "__main__":
    main()
