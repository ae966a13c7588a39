"""``python -m vmm sweep``: one agent workload across a grid of virtio-fs device options.

For every combination of the listed option values and every repeat, a guest boots with one share
(``/mnt/data``) carrying those options and runs the workload. The device's own counters say how
many LOOKUPs (and requests in all) reached the host; the agent's step timings give the guest-side
cost per operation. Each repeat walks the grid in a different rotation, so a slow spell of the
host does not land on one configuration. ``--out DIR`` receives:

* ``sweep.json``: every run, and min/median per point;
* ``sweep.md``: the table of medians;
* ``sweep.png``: host LOOKUPs and guest microseconds per operation against the swept numeric
  option (``negative_timeout`` unless only ``timeout`` varies), one line per cache mode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devices.virtio.fs.options import FsOptions

from .config import ConfigError

#: The default workload: a shell-like PATH search, 50 missing names probed 20 times each.
DEFAULT_WORKLOAD = "probe /mnt/data 50 20 expect=ENOENT"
TAG = "data"
#: Options a sweep can vary, with the parser for one value.
AXES: dict[str, Callable[[str], Any]] = {
    "negative_timeout": float,
    "timeout": float,
    "cache": str,
}
NUMERIC_AXES = ("negative_timeout", "timeout")


@dataclass(frozen=True)
class SweepRun:
    options: dict[str, Any]
    repeat: int
    exit_status: int
    lookups: int
    requests: int
    guest_ns_per_op: float | None
    ops: dict[str, int]


def parse_axis(name: str, text: str) -> list[Any]:
    """``"0,0.1,1"`` -> [0.0, 0.1, 1.0], each value checked as a device option would be."""
    parse = AXES[name]
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ConfigError(f"--{name.replace('_', '-')}: empty value in {text!r}")
        try:
            value = parse(part)
            FsOptions(source=".", tag="x", **{name: value})
        except ValueError as e:
            raise ConfigError(f"--{name.replace('_', '-')}: {part!r}: {e}") from None
        values.append(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"--{name.replace('_', '-')}: repeated value in {text!r}")
    return values


def grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def guest_ns_per_op(steps: list[Any]) -> float | None:
    """Guest time per operation: steps that repeat an op (``stat xN``, ``probe``) report a count,
    the rest count once; mount and exit steps are set-up, not workload."""
    ns = ops = 0
    for s in steps:
        if s.op in ("mount", "exit", "mark", "echo") or s.ns is None:
            continue
        count = int(s.extra.get("count", 1))
        ns += s.ns
        ops += count
    return ns / ops if ops else None


def run_point(options: dict[str, Any], repeat: int, script: str, kernel: str) -> SweepRun:
    from .runner import guest_config, run_guest

    with tempfile.TemporaryDirectory(prefix="pyvmm-sweep-") as share:
        config = guest_config(script, (FsOptions(source=share, tag=TAG, **options),),
                              kernel=kernel)
        result, output = run_guest(config)
    failed = [s.raw for s in result.steps if not s.ok]
    if result.exit_status != 0 or failed:
        tail = "\n".join(output.splitlines()[-20:])
        raise RuntimeError(f"the workload failed with {options}: exit status "
                           f"{result.exit_status} ({result.message}); failed steps {failed}\n{tail}")
    dev = result.metrics[f"fs:{TAG}"]
    return SweepRun(options=options, repeat=repeat, exit_status=result.exit_status,
                    lookups=int(dev["ops"].get("LOOKUP", 0)), requests=int(dev["requests"]),
                    guest_ns_per_op=guest_ns_per_op(result.steps), ops=dict(dev["ops"]))


def run_sweep(script: str, axes: dict[str, list[Any]], repeat: int, kernel: str,
              progress: Callable[[str], None]) -> list[SweepRun]:
    points = grid(axes)
    runs: list[SweepRun] = []
    total = len(points) * repeat
    started = time.monotonic()
    for r in range(repeat):
        shift = r % len(points)
        for options in points[shift:] + points[:shift]:
            run = run_point(options, r, script, kernel)
            runs.append(run)
            elapsed = time.monotonic() - started
            left = elapsed / len(runs) * (total - len(runs))
            us = "n/a" if run.guest_ns_per_op is None else f"{run.guest_ns_per_op / 1000:.1f} us/op"
            progress(f"[{len(runs)}/{total}] {_label(options)}: {run.lookups} LOOKUPs, {us} "
                     f"(about {left / 60:.0f} min left)")
    return runs


def _label(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


def summarize(runs: list[SweepRun]) -> list[dict[str, Any]]:
    by_point: dict[str, list[SweepRun]] = {}
    for run in runs:
        by_point.setdefault(json.dumps(run.options, sort_keys=True), []).append(run)
    rows = []
    for key, group in by_point.items():
        us = [r.guest_ns_per_op / 1000 for r in group if r.guest_ns_per_op is not None]
        rows.append({
            "options": json.loads(key), "runs": len(group),
            "lookups_min": min(r.lookups for r in group),
            "lookups_median": statistics.median(r.lookups for r in group),
            "requests_median": statistics.median(r.requests for r in group),
            "guest_us_per_op_min": min(us) if us else None,
            "guest_us_per_op_median": statistics.median(us) if us else None,
        })
    return rows


def markdown(rows: list[dict[str, Any]], axes: list[str]) -> str:
    head = axes + ["LOOKUPs to host (median)", "requests (median)", "guest us/op (median)",
                   "guest us/op (min)", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        us_med, us_min = row["guest_us_per_op_median"], row["guest_us_per_op_min"]
        cells = [str(row["options"][a]) for a in axes] + [
            f"{row['lookups_median']:g}", f"{row['requests_median']:g}",
            "n/a" if us_med is None else f"{us_med:.1f}", "n/a" if us_min is None else f"{us_min:.1f}",
            str(row["runs"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], axes: dict[str, list[Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [a for a in NUMERIC_AXES if len(axes.get(a, ())) > 1] or \
        [a for a in NUMERIC_AXES if a in axes]
    x_axis = numeric[0] if numeric else None
    fig, (ax_l, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        key = " ".join(f"{k}={v}" for k, v in row["options"].items() if k != x_axis) or "all"
        groups.setdefault(key, []).append(row)
    for key, group in sorted(groups.items()):
        group.sort(key=lambda r: r["options"].get(x_axis, 0) if x_axis else 0)
        xs = [r["options"][x_axis] if x_axis else i for i, r in enumerate(group)]
        ax_l.plot(xs, [r["lookups_median"] for r in group], marker="o", label=key)
        ax_t.plot(xs, [r["guest_us_per_op_median"] for r in group], marker="o", label=key)
    for ax, ylabel in ((ax_l, "LOOKUPs reaching the host"), (ax_t, "guest us per operation")):
        if x_axis:
            ax.set_xscale("symlog", linthresh=0.1)
            ax.set_xlabel(f"{x_axis} (s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_l.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="run one workload across a grid of device options",
                       description="Run one agent workload across a grid of virtio-fs "
                                   "device options; write JSON, a Markdown table and a PNG plot.",
                       epilog="example: python -m vmm sweep --negative-timeout 0,1,60 "
                              "--cache never,auto --repeat 2 --out sweep-out")
    script = p.add_mutually_exclusive_group()
    script.add_argument("--exec", dest="exec_", metavar="'OP; OP; ...'",
                        help=f"the workload (the share is /mnt/{TAG}); default: "
                             f"'{DEFAULT_WORKLOAD}'")
    script.add_argument("--script", type=Path, help="the workload, from a file")
    p.add_argument("--negative-timeout", default="0,0.1,1,10,60", metavar="S,S,...")
    p.add_argument("--timeout", default=None, metavar="S,S,...",
                   help="positive entry/attribute timeouts (default: the device default)")
    p.add_argument("--cache", default="auto", metavar="never,auto,always")
    p.add_argument("--repeat", type=int, default=1, help="runs per point (min/median reported)")
    p.add_argument("--kernel", default="auto", help="guest kernel (default: the project kernel)")
    p.add_argument("--out", type=Path, required=True, help="directory for JSON, Markdown, PNG")
    return p


def main(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    if args.repeat < 1:
        raise ConfigError("--repeat must be >= 1")
    if args.script is not None:
        if not args.script.is_file():
            raise ConfigError(f"--script: {args.script} does not exist")
        script = args.script.read_text()
    else:
        script = args.exec_ or DEFAULT_WORKLOAD
    axes: dict[str, list[Any]] = {"negative_timeout": parse_axis("negative_timeout",
                                                                args.negative_timeout)}
    if args.timeout is not None:
        axes["timeout"] = parse_axis("timeout", args.timeout)
    axes["cache"] = parse_axis("cache", args.cache)
    kernel = args.kernel
    if kernel == "auto":
        from guest.build import ensure_kernel
        kernel = str(ensure_kernel(progress=progress))
    progress(f"sweep: {len(grid(axes))} points x {args.repeat} repeat(s), one guest each")
    runs = run_sweep(script, axes, args.repeat, kernel, progress)
    rows = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"workload": script.strip(), "axes": axes, "repeat": args.repeat, "kernel": kernel,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (args.out / "sweep.json").write_text(json.dumps(
        {**meta, "points": rows, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    table = markdown(rows, list(axes))
    (args.out / "sweep.md").write_text(f"Workload: `{script.strip()}`\n\n{table}")
    plot(rows, axes, args.out / "sweep.png", f"workload: {script.strip()}")
    sys.stdout.write(table)
    progress(f"sweep: wrote {args.out}/sweep.json, sweep.md, sweep.png")
    return 0
