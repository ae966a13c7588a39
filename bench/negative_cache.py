"""negative_timeout: LOOKUPs that reach the host and guest time per missing-name stat.

The same probe workload (NAMES missing names, each probed ROUNDS times round robin, as a shell's
PATH search does) runs on two shares in one guest: negative_timeout 0 (the reference) and N.
The guest is booted REPEAT times and the order of the two probes alternates from boot to boot
(so neither always runs first, on a colder guest); reported are min and median over the boots
and the ratios of the two medians, measured in the same run.

    python bench/negative_cache.py [--names 50] [--rounds 20] [--negative-timeout 60] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import boot, spread, write_result  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402

CONFIGS = ("plain", "cached")


def one_boot(names: int, rounds: int, negative_timeout: float, order: tuple[str, ...]) -> dict:
    """Boot once, probing the shares in ``order``; per share: stats, LOOKUPs, ns per stat."""
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        script = "".join(f"probe /mnt/{tag} {names} {rounds} expect=ENOENT\n" for tag in order)
        r = boot(script + "exit 0\n",
                 shares=(FsOptions(source=a, tag="plain"),
                         FsOptions(source=b, tag="cached", negative_timeout=negative_timeout)))
    rows = {}
    for tag, step in zip(order, (s for s in r.steps if s.op == "probe")):
        fs = r.metrics[f"fs:{tag}"]
        rows[tag] = {"stats": int(step.extra["count"]), "lookups": fs["ops"].get("LOOKUP", 0),
                     "ns_per_stat": int(step.extra["ns_per_op"])}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--negative-timeout", type=float, default=60.0)
    p.add_argument("--repeat", type=int, default=3, help="guest boots (the probe order alternates)")
    args = p.parse_args()
    boots = []
    for i in range(args.repeat):
        order = CONFIGS if i % 2 == 0 else CONFIGS[::-1]
        print(f"boot {i + 1}/{args.repeat}: {' then '.join(order)}", file=sys.stderr, flush=True)
        boots.append({"order": list(order), **one_boot(args.names, args.rounds,
                                                       args.negative_timeout, order)})
    summary = {tag: {"lookups": spread([b[tag]["lookups"] for b in boots]),
                     "ns_per_stat": spread([b[tag]["ns_per_stat"] for b in boots])}
               for tag in CONFIGS}
    plain, cached = summary["plain"], summary["cached"]
    write_result("negative_cache", {
        "names": args.names, "rounds": args.rounds, "negative_timeout": args.negative_timeout,
        "repeat": args.repeat, "boots": boots,
        "reference_negative_timeout_0": plain, "with_negative_timeout": cached,
        "lookup_reduction": plain["lookups"]["median"] / max(cached["lookups"]["median"], 1),
        "stat_speedup": plain["ns_per_stat"]["median"] / max(cached["ns_per_stat"]["median"], 1)})


if __name__ == "__main__":
    main()
