"""DAX: READ requests and guest-side read time of one file, with and without the DAX window.

One guest (the `dax` kernel variant, which `kernel: auto` picks because a share asks for DAX)
mounts two shares holding the same SIZE-byte file: ``plain`` (no DAX; the reference) and ``dax``
(``dax: true``, mounted dax=always). It reads each file twice (cold, then again: the plain share
from the guest page cache, the DAX share through mappings that are still in place), alternating
which share goes first on each boot. Reported per share and pass: READ and SETUPMAPPING requests
and the agent's read step time (guest ns); the ratios are DAX / plain, medians over the boots.

    python bench/dax_read.py [--size-mib 16] [--window-mib 64] [--repeat 2]

The default file is the issue's 16 MiB (about 4 minutes for 2 boots here): the guest reads with
the agent's sum64, the cheapest checksum in this emulated guest (CRC-32 ran at tens of KiB/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import boot, spread, write_result  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402
from guest.script import sum64  # noqa: E402

TAGS = ("plain", "dax")


def one_boot(size: int, window_mib: int, order: tuple[str, ...]) -> dict:
    data = os.urandom(size)
    want = sum64(data)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        for d in (a, b):
            Path(d, "big").write_bytes(data)
        shares = (FsOptions(source=a, tag="plain"),
                  FsOptions(source=b, tag="dax", dax=True, sandbox="none", dax_window_mib=window_mib))
        # sum64, not crc32: the checksum is part of the step's time and sum64 costs a fifth.
        script = "".join(f"read /mnt/{tag}/big sum64\n" for tag in order * 2)
        # Request counts are per share over both passes; times per pass from the step lines.
        r = boot(script + "exit 0\n", shares=shares)
    reads = [s for s in r.steps if s.op == "read"]
    rows: dict = {tag: {} for tag in TAGS}
    for i, step in enumerate(reads):
        tag = order[i % len(order)]
        if step.get_int("sum64") != want:
            raise SystemExit(f"{tag}: checksum mismatch on pass {i // len(order) + 1}")
        rows[tag]["cold_ns" if i < len(order) else "warm_ns"] = step.ns
    for tag in TAGS:
        ops = r.metrics[f"fs:{tag}"]["ops"]
        rows[tag]["read_requests"] = ops.get("READ", 0)
        rows[tag]["setupmapping_requests"] = ops.get("SETUPMAPPING", 0)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=16)
    p.add_argument("--window-mib", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="guest boots (the order alternates)")
    args = p.parse_args()
    boots = []
    for i in range(args.repeat):
        order = TAGS if i % 2 == 0 else TAGS[::-1]
        boots.append(one_boot(args.size_mib << 20, args.window_mib, order))
        print(f"boot {i + 1}/{args.repeat} ({' then '.join(order)}): {boots[-1]}", file=sys.stderr)
    summary = {}
    for tag in TAGS:
        summary[tag] = {key: spread([b[tag][key] for b in boots])
                        for key in ("cold_ns", "warm_ns", "read_requests", "setupmapping_requests")}
    med = {tag: {k: statistics.median(b[tag][k] for b in boots) for k in ("cold_ns", "warm_ns")}
           for tag in TAGS}
    write_result("dax_read", {
        "command": "python bench/dax_read.py " + " ".join(sys.argv[1:]),
        "file_bytes": args.size_mib << 20, "window_mib": args.window_mib,
        "reference": "plain (same guest, same kernel, no DAX)",
        "boots": boots, "summary": summary,
        "ratio_dax_over_plain": {k: round(med["dax"][k] / med["plain"][k], 3)
                                 for k in ("cold_ns", "warm_ns")},
    })


if __name__ == "__main__":
    main()
