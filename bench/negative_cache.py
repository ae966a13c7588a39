"""negative_timeout: LOOKUPs that reach the host and guest time per missing-name stat.

The same probe workload (NAMES missing names, each probed ROUNDS times round robin, as a shell's
PATH search does) runs on two shares in one guest: negative_timeout 0 (the reference) and N.
Reported as ratios against the reference measured in the same run.

    python bench/negative_cache.py [--names 50] [--rounds 20] [--negative-timeout 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import boot, write_result  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--negative-timeout", type=float, default=60.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        r = boot(f"probe /mnt/plain {args.names} {args.rounds} expect=ENOENT\n"
                 f"probe /mnt/cached {args.names} {args.rounds} expect=ENOENT\nexit 0\n",
                 shares=(FsOptions(source=a, tag="plain"),
                         FsOptions(source=b, tag="cached", negative_timeout=args.negative_timeout)))
    plain, cached = (s for s in r.steps if s.op == "probe")
    rows = {}
    for tag, step in (("plain", plain), ("cached", cached)):
        fs = r.metrics[f"fs:{tag}"]
        rows[tag] = {"stats": int(step.extra["count"]), "lookups": fs["ops"].get("LOOKUP", 0),
                     "ns_per_stat": int(step.extra["ns_per_op"])}
    write_result("negative_cache", {
        "names": args.names, "rounds": args.rounds, "negative_timeout": args.negative_timeout,
        "reference_negative_timeout_0": rows["plain"], "with_negative_timeout": rows["cached"],
        "lookup_reduction": rows["plain"]["lookups"] / max(rows["cached"]["lookups"], 1),
        "stat_speedup": rows["plain"]["ns_per_stat"] / max(rows["cached"]["ns_per_stat"], 1)})


if __name__ == "__main__":
    main()
