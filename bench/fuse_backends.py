"""Host CPU per FUSE request: our virtio-fs server vs C virtiofsd, on the same guest workload.

One guest script, run through five configurations, alternated round by round:

    ours-inproc          our VMM, the device in the VMM process (`type: fs`, virtio-mmio)
    ours-vhost-user      our VMM + our back-end process over vhost-user (`python -m vmm device fs`)
    virtiofsd            our VMM + C virtiofsd over vhost-user (/usr/lib/qemu/virtiofsd)
    qemu+ours-vhost-user QEMU 7.2 microvm + our back-end
    qemu+virtiofsd       QEMU 7.2 microvm + C virtiofsd

The script marks the boundaries of its workloads (and sleeps a moment after each mark, so the
host reads its counters while the guest is idle):

    probe   `probe /mnt/TAG 50 20 expect=ENOENT`: 1,000 stats of missing names, one LOOKUP each
    small   FILES small files: each written (created), then each stat'ed, read, unlinked
    io      `write /mnt/TAG/big SIZE 1` (segment `write`), then `read /mnt/TAG/big sum64` (`read`)

At each mark the host reads the FUSE server's CPU time, from schedstat (ns, not clock ticks):
the device's worker thread (OS name `pyvmm-fs-TAG`) and, for a back-end process, every thread
of the process and of its children (C virtiofsd forks into its namespace sandbox: the child
serves, the parent waits). The front-end's CPU (our VMM minus an in-process worker, or QEMU) is
read too. Requests per workload: ours count them (control socket, per opcode); C virtiofsd keeps
no counters, so one extra untimed boot runs it with `-d` and counts its `opcode:` log lines
between the marks (the timed rounds run without `-d`, which costs CPU per request). The guest's
requests are the same whichever VMM drives the server, so the census of our VMM + virtiofsd
serves both front-ends.

Figures: server CPU us per request (min / median over rounds), requests per workload (ours per
round and per opcode; virtiofsd's census), the guest's latency (ns per stat from the agent, ns per
small-file op, MiB/s of the write and the read), and ratios to C virtiofsd under the same
front-end, measured in the same run. JSON in bench/results/fuse_backends.json.

    python bench/fuse_backends.py [--rounds 2] [--size 2M] [--files 100] [--configs a,b,...]

The defaults are smaller than the issues' workload (200 files, 16 MiB): on this shared 2-core
kvm_pvm machine a missing-name stat takes 20-80 ms of emulated guest time, so eleven boots of the
full workload take about an hour; the defaults take about 25 minutes. Request counts scale with the
workload (a WRITE and a READ per 128 KiB, about 13 requests per small file), CPU per request is
what is compared. `--files 200 --size 16M` runs the issues' workload.

`bench/fuse_cpu.py` (issue 9's name) runs this same benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402
from devices.virtio.fs.worker import os_thread_name  # noqa: E402
from devices.virtio.vhost_user.frontend import VhostUserFsOptions  # noqa: E402
from guest.script import render  # noqa: E402
from vmm.qemu import BackendProcess, QemuGuest, VirtiofsdProcess, thread_cpu_seconds_by_name  # noqa: E402

TAG = "bench"
CONFIGS = ("ours-inproc", "ours-vhost-user", "virtiofsd", "qemu+ours-vhost-user", "qemu+virtiofsd")
#: Accepted by --configs, not run by default: ``ours-sandboxed`` is our VMM with the default
#: `type: fs` device, a jailed child over vhost-user (bench/sandbox_cost.py compares it with
#: ours-inproc).
EXTRA_CONFIGS = ("ours-sandboxed",)
#: (ours, the C virtiofsd configuration under the same front-end)
PAIRS = (("ours-inproc", "virtiofsd"), ("ours-vhost-user", "virtiofsd"),
         ("qemu+ours-vhost-user", "qemu+virtiofsd"))
MARKS = ("m0", "m1", "m2", "m3", "m4")
SEGMENTS = {"probe": ("m0", "m1"), "small": ("m1", "m2"), "write": ("m2", "m3"),
            "read": ("m3", "m4"), "io": ("m2", "m4")}
WORKLOADS = ("probe", "small", "io")       # what the table and the ratios report
SMALL_OPS = ("write", "stat", "read", "unlink")
SMALL_FILE_SIZE = 4096
BOOT_TIMEOUT = 1800


# ---------------------------------------------------------------------------- the guest script
def script(size: int, files: int, probe: tuple[int, int] = (50, 20)) -> str:
    """The agent script: marks around each workload, a 300 ms idle after each mark; ``probe`` is
    (missing names, rounds)."""
    m = f"/mnt/{TAG}"
    small = [f"write {m}/s{i} {SMALL_FILE_SIZE} {i}" for i in range(files)]
    small += [f"stat {m}/s{i}" for i in range(files)]
    small += [f"read {m}/s{i} sum64" for i in range(files)]
    small += [f"unlink {m}/s{i}" for i in range(files)]
    return render([
        "mark m0", "sleep 300",
        f"probe {m} {probe[0]} {probe[1]} expect=ENOENT",
        "mark m1", "sleep 300",
        *small,
        "mark m2", "sleep 300",
        f"write {m}/big {size} 1",
        "mark m3", "sleep 300",
        f"read {m}/big sum64",
        "mark m4", "sleep 300",
        "exit 0"])      # render() checks every op and argument count against the agent's table


def mark_of(line: bytes) -> str | None:
    """The mark a console line announces (`op=mark ... name=mN`), else None."""
    if b"op=mark" not in line:
        return None
    m = re.search(rb"\bname=(\S+)", line)
    if m is None:
        return None
    name = m.group(1).decode(errors="replace")
    return name if name in MARKS else None


def segment_steps(steps: Iterable[Any], a: str, b: str) -> list[Any]:
    """The agent steps strictly between `mark a` and `mark b` (not the sleeps after a mark)."""
    out: list[Any] = []
    inside = False
    for s in steps:
        if s.op == "mark":
            name = s.extra.get("name")
            if name == a:
                inside = True
            elif name == b:
                break
            continue
        if inside and s.op != "sleep":
            out.append(s)
    return out


# ---------------------------------------------------------------------------- host CPU from /proc
def schedstat_seconds(text: str) -> float:
    """Run time on the CPU from a schedstat line (`RUN_NS WAIT_NS SLICES`), in seconds."""
    return int(text.split()[0]) / 1e9


def children_of(text: str) -> list[int]:
    """Pids in a /proc/PID/task/TID/children file (space-separated)."""
    return [int(p) for p in text.split()]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of every live thread of `pid` and of its descendants, from schedstat (ns
    resolution; /proc/PID/stat's utime+stime count 10 ms ticks, too coarse for ~50 ms segments).
    Threads that already exited are not counted: the servers measured here keep theirs."""
    total = 0.0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            stat = _read(f"/proc/{p}/task/{tid}/schedstat")
            if stat:
                total += schedstat_seconds(stat)
            kids = _read(f"/proc/{p}/task/{tid}/children")
            if kids:
                todo.extend(children_of(kids))
    return total


# ---------------------------------------------------------------------------- request census
_OPCODE = re.compile(rb"opcode: (\w+)")


def count_opcodes(log: bytes) -> dict[str, int]:
    """Requests per opcode in a C virtiofsd `-d` log (`... opcode: LOOKUP (1), ...` lines)."""
    counts: dict[str, int] = {}
    for m in _OPCODE.finditer(log):
        op = m.group(1).decode()
        counts[op] = counts.get(op, 0) + 1
    return counts


def ops_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per-opcode counter difference, zero entries left out."""
    out = {op: n - before.get(op, 0) for op, n in after.items()}
    return {op: n for op, n in sorted(out.items()) if n}


def request_differences(ours: dict[str, int], ref: dict[str, int]) -> dict[str, dict[str, int]]:
    """Opcodes whose counts differ: {op: {"ours": n, "virtiofsd": m}}."""
    return {op: {"ours": ours.get(op, 0), "virtiofsd": ref.get(op, 0)}
            for op in sorted(set(ours) | set(ref)) if ours.get(op, 0) != ref.get(op, 0)}


# ---------------------------------------------------------------------------- statistics
def spread(values: Sequence[float]) -> dict[str, Any]:
    """min / median / every value (rounds are few and the machine is shared: the min is the
    least disturbed round, the median the typical one)."""
    return {"min": min(values), "median": statistics.median(values), "all": list(values)}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------- one boot
class Round:
    """One boot of one configuration: snapshots at the marks, the agent's steps."""

    def __init__(self, config: str) -> None:
        self.config = config
        self.snaps: dict[str, dict[str, Any]] = {}
        self.steps: list[Any] = []

    def segment(self, name: str) -> dict[str, Any]:
        """Counter differences over a segment (numbers, and `ops` per opcode when counted)."""
        a, b = SEGMENTS[name]
        if a not in self.snaps or b not in self.snaps:
            raise RuntimeError(f"{self.config}: no snapshot at {a} / {b} (saw {sorted(self.snaps)})")
        out: dict[str, Any] = {}
        for k, v in self.snaps[b].items():
            if k == "ops":
                out[k] = ops_delta(self.snaps[a][k], v)
            else:
                out[k] = v - self.snaps[a][k]
        return out

    def steps_of(self, name: str) -> list[Any]:
        return segment_steps(self.steps, *SEGMENTS[name])

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "snaps": self.snaps, "steps": [s.raw for s in self.steps]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Round:
        from guest.console import parse_line
        r = cls(data["config"])
        r.snaps = data["snaps"]
        r.steps = [s for s in map(parse_line, data["steps"]) if s is not None]
        return r


def _snapshotter(rnd: Round, snapshot) -> Any:
    def on_line(line: bytes) -> None:
        name = mark_of(line)
        if name is not None:
            rnd.snaps[name] = snapshot()
    return on_line


def _ours_counters(stats: dict[str, Any]) -> dict[str, Any]:
    return {"requests": stats["requests"], "ops": dict(stats["ops"])}


def run_ours(config: str, share: Path, workdir: Path, kernel: Path, script_text: str,
             census: bool = False) -> tuple[Round, VirtiofsdProcess | None]:
    """Our VMM (in this process) with the device in-process, our back-end child, or virtiofsd.
    With `census`, virtiofsd runs with -d and is returned still running (its log offsets are in
    the snapshots); the caller stops it."""
    from vmm.control import request
    from vmm.runner import guest_config, run_guest

    rnd = Round(config)
    server: BackendProcess | VirtiofsdProcess | None = None
    ctl = str(workdir / "vmm-ctl.sock")
    # ours-inproc: the device a worker thread of this process (sandbox none), as it always was
    options = FsOptions(source=str(share), tag=TAG,
                        sandbox="namespace" if config == "ours-sandboxed" else "none")
    worker = os_thread_name(TAG)
    me = os.getpid()
    if config in ("ours-inproc", "ours-sandboxed"):
        device: Any = options
    elif config == "ours-vhost-user":
        server = BackendProcess(options, workdir).start()
        device = VhostUserFsOptions(str(server.socket), TAG)
    else:
        server = VirtiofsdProcess(options, workdir, debug=census).start()
        device = VhostUserFsOptions(str(server.socket), TAG)

    def snapshot() -> dict[str, Any]:
        snap: dict[str, Any] = {"vmm_s": process_tree_cpu_seconds(me)}
        if config == "ours-sandboxed":
            # the jailed child (and its relay) is the server: the VMM keeps only the registers
            stats = request(ctl, "stats")["devices"][f"fs:{TAG}"]
            child = stats["sandbox"]
            snap["server_s"] = process_tree_cpu_seconds(child["relay_pid"])
            snap["vmm_s"] -= snap["server_s"]
            snap["worker_s"] = thread_cpu_seconds_by_name(child["pid"], worker) or 0.0
            snap.update(_ours_counters(stats))
            return snap
        if server is None:
            snap["worker_s"] = thread_cpu_seconds_by_name(me, worker) or 0.0
            snap["server_s"] = snap["worker_s"]
            snap["vmm_s"] -= snap["worker_s"]
            snap.update(_ours_counters(request(ctl, "stats")["devices"][f"fs:{TAG}"]))
            return snap
        snap["vmm_s"] -= process_tree_cpu_seconds(server.pid)   # our child's threads are not the VMM's
        snap["server_s"] = process_tree_cpu_seconds(server.pid)
        if isinstance(server, BackendProcess):
            snap["worker_s"] = server.worker_cpu_seconds() or 0.0
            snap.update(_ours_counters(server.stats()))
        elif census:
            snap["log_offset"] = server.log_path.stat().st_size
        return snap

    try:
        cfg = guest_config(script_text, [device], kernel=kernel, timeout=BOOT_TIMEOUT)
        result, output = run_guest(cfg, control_path=ctl, on_line=_snapshotter(rnd, snapshot))
        if result.exit_status != 0:
            raise SystemExit(f"{config}: guest failed ({result.exit_status}: {result.message})\n"
                             + output[-2000:])
        rnd.steps = list(result.steps)
    finally:
        if server is not None and not census:
            server.stop()
    return rnd, server if census else None


def run_qemu(config: str, share: Path, workdir: Path, kernel: Path, script_text: str) -> Round:
    """QEMU microvm with our back-end or C virtiofsd."""
    rnd = Round(config)
    options = FsOptions(source=str(share), tag=TAG)
    server: BackendProcess | VirtiofsdProcess
    if config == "qemu+ours-vhost-user":
        server = BackendProcess(options, workdir).start()
    else:
        server = VirtiofsdProcess(options, workdir).start()
    qemu_pid: list[int] = []

    def snapshot() -> dict[str, Any]:
        snap: dict[str, Any] = {"server_s": process_tree_cpu_seconds(server.pid),
                                "vmm_s": process_tree_cpu_seconds(qemu_pid[0]) if qemu_pid else 0.0}
        if isinstance(server, BackendProcess):
            snap["worker_s"] = server.worker_cpu_seconds() or 0.0
            snap.update(_ours_counters(server.stats()))
        return snap

    try:
        with QemuGuest(kernel, script_text, [server], workdir, on_line=_snapshotter(rnd, snapshot)) as q:
            assert q.proc is not None
            qemu_pid.append(q.proc.pid)
            status = q.wait_exit_line(BOOT_TIMEOUT)
            if status != 0:
                raise SystemExit(f"{config}: guest failed ({status})\n{q.output[-2000:]}")
            rnd.steps = list(q.parser.steps)
    finally:
        server.stop()
    return rnd


def virtiofsd_census(share: Path, workdir: Path, kernel: Path, script_text: str) -> dict[str, dict[str, int]]:
    """Requests per segment and opcode C virtiofsd saw, from its -d log between the marks (untimed)."""
    rnd, server = run_ours("virtiofsd", share, workdir, kernel, script_text, census=True)
    assert server is not None
    server.stop()
    log = server.log_path.read_bytes()
    out: dict[str, dict[str, int]] = {}
    for seg, (a, b) in SEGMENTS.items():
        out[seg] = count_opcodes(log[int(rnd.snaps[a]["log_offset"]):int(rnd.snaps[b]["log_offset"])])
    return out


# ---------------------------------------------------------------------------- summary
def guest_figures(rounds: list[Round], size: int) -> dict[str, Any]:
    """What the guest saw: ns per missing-name stat, ns per small-file op, MiB/s of the big file."""
    probe = [r.steps_of("probe")[0].get_int("ns_per_op") for r in rounds]
    write = [r.steps_of("write")[0].ns for r in rounds]
    read = [r.steps_of("read")[0].ns for r in rounds]
    mib = size / 2**20
    out: dict[str, Any] = {
        "probe_ns_per_stat": spread(probe),
        "write_mib_s": spread([mib / (ns / 1e9) for ns in write]),
        "read_mib_s": spread([mib / (ns / 1e9) for ns in read]),
    }
    for op in SMALL_OPS:
        per_round = []
        for r in rounds:
            ns = [s.ns for s in r.steps_of("small") if s.op == op]
            if ns:
                per_round.append(sum(ns) / len(ns))
        if per_round:
            out[f"small_{op}_ns"] = spread(per_round)
    return out


def summarize(rounds: list[Round], census: dict[str, dict[str, int]] | None, size: int) -> dict[str, Any]:
    """Per workload: requests, CPU per request (server, worker, front-end), server CPU per workload."""
    out: dict[str, Any] = {}
    for seg in SEGMENTS:
        per_round = [r.segment(seg) for r in rounds]
        counted = all("requests" in d for d in per_round)
        if counted:
            requests = [int(d["requests"]) for d in per_round]
            ops = per_round[-1].get("ops", {})
        elif census is not None:
            ops = census[seg]
            requests = [sum(ops.values())] * len(per_round)
        else:
            raise RuntimeError("no request counts: neither counters nor a census")
        seg_out: dict[str, Any] = {"requests": spread(requests), "ops": ops,
                                   "requests_from": "counters" if counted else "virtiofsd -d census"}
        for key in ("server_s", "worker_s", "vmm_s"):
            vals = [d[key] / n * 1e6 for d, n in zip(per_round, requests) if key in d and n]
            if vals:
                seg_out[key.replace("_s", "_us_per_request")] = spread(vals)
        seg_out["server_ms"] = spread([d["server_s"] * 1e3 for d in per_round])
        out[seg] = seg_out
    out["guest"] = guest_figures(rounds, size)
    return out


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours / C virtiofsd (same front-end, same run): server CPU per request (median, and
    min over min), server CPU per workload, requests, and the guest's latency."""
    out: dict[str, Any] = {}
    for seg in (*WORKLOADS, "write", "read"):
        o, r = ours[seg], ref[seg]
        out[seg] = {
            "server_us_per_request": ratio(o["server_us_per_request"]["median"],
                                           r["server_us_per_request"]["median"]),
            "server_us_per_request_min": ratio(o["server_us_per_request"]["min"],
                                               r["server_us_per_request"]["min"]),
            "server_cpu_per_workload": ratio(o["server_ms"]["median"], r["server_ms"]["median"]),
            "requests": ratio(o["requests"]["median"], r["requests"]["median"]),
            "request_differences": request_differences(o["ops"], r["ops"]),
        }
        if "worker_us_per_request" in o:
            out[seg]["worker_vs_server_us_per_request"] = ratio(
                o["worker_us_per_request"]["median"], r["server_us_per_request"]["median"])
    g, gr = ours["guest"], ref["guest"]
    out["guest"] = {k: ratio(g[k]["median"], gr[k]["median"]) for k in g if k in gr}
    return out


def machine() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return ""
    return {"cpu": first("/proc/cpuinfo", "model name"), "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(),
            "load_before": os.getloadavg(), "kvm_pvm": Path("/sys/module/kvm_pvm").exists()}


def parse_size(text: str) -> int:
    """`16M`, `512K`, `1G` or a plain number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip()
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=parse_size, default=2 << 20, help="bytes written and read back (2M)")
    p.add_argument("--files", type=int, default=100, help="files in the small-file workload (100)")
    p.add_argument("--probe", default="50x20", help="missing names x rounds of the probe (50x20)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--kernel", type=Path, help="guest kernel (default: the cached project kernel)")
    p.add_argument("--from-raw", type=Path, metavar="JSON",
                   help="no boots: summarize the raw rounds a previous run saved (fuse_backends-raw.json)")
    args = p.parse_args(argv)
    command = "python bench/fuse_backends.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_raw is not None:
        raw = json.loads(args.from_raw.read_text())
        report({c: [Round.from_json(r) for r in rs] for c, rs in raw["rounds"].items()},
               raw["census"], raw["args"], raw["machine"], raw["command"], raw["wall_s"])
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS) - set(EXTRA_CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs: {', '.join(sorted(unknown))}")
    if args.kernel is None:
        from guest.build import ensure_kernel
        args.kernel = ensure_kernel(progress=lambda m: print(f"guest kernel: {m}", file=sys.stderr))
    names, probe_rounds = (int(x) for x in args.probe.split("x"))
    text = script(args.size, args.files, (names, probe_rounds))
    desc = machine()
    print(f"load average before: {desc['load_before']}", file=sys.stderr)
    rounds: dict[str, list[Round]] = {c: [] for c in configs}
    census = None
    workroot = Path(tempfile.mkdtemp(prefix="pyvmm-bench-"))
    started_all = time.monotonic()
    try:
        if any("virtiofsd" in c for c in configs):
            share = workroot / "census"
            share.mkdir()
            wd = workroot / "census-wd"
            wd.mkdir()
            print("virtiofsd request census (-d, untimed) ...", file=sys.stderr)
            census = virtiofsd_census(share, wd, args.kernel, text)
            print(f"census: { {seg: sum(c.values()) for seg, c in census.items()} }", file=sys.stderr)
        for i in range(args.rounds):
            order = configs if i % 2 == 0 else list(reversed(configs))   # alternate
            for config in order:
                share = workroot / f"share-{i}-{config.replace('+', '-')}"
                share.mkdir()
                wd = Path(tempfile.mkdtemp(prefix="w", dir=workroot))
                started = time.monotonic()
                if config.startswith("qemu+"):
                    rnd = run_qemu(config, share, wd, args.kernel, text)
                else:
                    rnd, _ = run_ours(config, share, wd, args.kernel, text)
                rounds[config].append(rnd)
                d = rnd.segment("probe")
                print(f"round {i + 1} {config}: {time.monotonic() - started:.0f} s, probe: server "
                      f"{d['server_s'] * 1e3:.1f} ms, vmm {d['vmm_s'] * 1e3:.1f} ms, "
                      f"requests {d.get('requests', '(census)')}", file=sys.stderr)
                shutil.rmtree(share, ignore_errors=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    desc["load_after"] = os.getloadavg()
    wall = round(time.monotonic() - started_all)
    run_args = {"rounds": args.rounds, "size": args.size, "files": args.files, "configs": configs,
                "probe": args.probe}
    # The raw rounds first: a summary bug must not cost the half hour of boots behind it.
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuse_backends-raw.json").write_text(json.dumps(
        {"rounds": {c: [r.to_json() for r in rs] for c, rs in rounds.items()}, "census": census,
         "args": run_args, "machine": desc, "command": command, "wall_s": wall}) + "\n")
    report(rounds, census, run_args, desc, command, wall)


def report(rounds: dict[str, list[Round]], census: dict[str, dict[str, int]] | None,
           run_args: dict[str, Any], desc: dict[str, Any], command: str, wall: int) -> None:
    """Summaries, ratios, the JSON result and the table."""
    summaries = {c: summarize(rs, census if "virtiofsd" in c else None, run_args["size"])
                 for c, rs in rounds.items()}
    ratios = {f"{ours} / {ref}": compare(summaries[ours], summaries[ref])
              for ours, ref in PAIRS if ours in summaries and ref in summaries}
    write_result("fuse_backends", {
        "machine": desc, **run_args, "small_file_size": SMALL_FILE_SIZE, "wall_s": wall,
        "virtiofsd_census": census, "results": summaries, "ratios": ratios, "command": command})
    print_table(summaries, ratios, desc)
    print("\n" + markdown(summaries, ratios), file=sys.stderr)


FRONTENDS = {"ours-inproc": "our VMM, device in-process", "ours-vhost-user": "our VMM, vhost-user",
             "qemu+ours-vhost-user": "QEMU 7.2, vhost-user"}


def markdown(summaries: dict[str, Any], ratios: dict[str, Any]) -> str:
    """The README's tables: server CPU per request against C virtiofsd, then the guest's view."""
    def us(row: dict[str, Any], key: str) -> str:
        return f"{row[key]['median']:.0f} ({row[key]['min']:.0f})" if key in row else "-"

    def x(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["| workload | front-end | requests ours / virtiofsd | ours: server us/request | "
             "ours: worker thread | C virtiofsd | ratio (min) |", "|---|---|---|---|---|---|---|"]
    for w in WORKLOADS:
        for (ours, ref) in PAIRS:
            key = f"{ours} / {ref}"
            if key not in ratios:
                continue
            o, r, q = summaries[ours][w], summaries[ref][w], ratios[key][w]
            reqs = "/".join(str(int(v)) for v in o["requests"]["all"])
            lines.append(f"| {w} | {FRONTENDS[ours]} | {reqs} / {r['requests']['median']:.0f} | "
                         f"{us(o, 'server_us_per_request')} | {us(o, 'worker_us_per_request')} | "
                         f"{us(r, 'server_us_per_request')} | **{x(q['server_us_per_request'])}** "
                         f"({x(q['server_us_per_request_min'])}) |")
    lines += ["", "| configuration | ns per missing-name stat | small file: write / stat / read / unlink, ms "
              "| big file write / read, MiB/s |", "|---|---|---|---|"]
    for c, s in summaries.items():
        g = s["guest"]
        small = " / ".join(f"{g[f'small_{op}_ns']['median'] / 1e6:.0f}" for op in SMALL_OPS
                           if f"small_{op}_ns" in g)
        lines.append(f"| {c} | {g['probe_ns_per_stat']['median'] / 1e6:.1f} ms | {small} | "
                     f"{g['write_mib_s']['median']:.3f} / {g['read_mib_s']['median']:.3f} |")
    return "\n".join(lines) + "\n"


def print_table(summaries: dict[str, Any], ratios: dict[str, Any], desc: dict[str, Any]) -> None:
    err = sys.stderr
    print(f"\nload {desc['load_before'][0]:.2f} before, {desc['load_after'][0]:.2f} after; "
          "server CPU us per FUSE request, median (min); requests (median)", file=err)
    print(f"{'config':22}" + "".join(f" {w + ' us':>14} {w + ' reqs':>10}" for w in WORKLOADS)
          + f" {'ns/stat':>10} {'write MiB/s':>11} {'read MiB/s':>10}", file=err)
    for c, s in summaries.items():
        cells = ""
        for w in WORKLOADS:
            row = s[w]["server_us_per_request"]
            cells += f" {row['median']:>7.0f} ({row['min']:>4.0f}) {s[w]['requests']['median']:>10.0f}"
        g = s["guest"]
        print(f"{c:22}{cells} {g['probe_ns_per_stat']['median']:>10.0f} "
              f"{g['write_mib_s']['median']:>11.3f} {g['read_mib_s']['median']:>10.3f}", file=err)
    def x(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"
    for name, r in ratios.items():
        cells = ", ".join(f"{w} {x(r[w]['server_us_per_request'])} ({x(r[w]['requests'])} requests)"
                          for w in WORKLOADS)
        print(f"{name}: server CPU per request {cells}; guest ns per stat "
              f"{x(r['guest'].get('probe_ns_per_stat'))}", file=err)


if __name__ == "__main__":
    main()
