"""Host CPU per FUSE request: our virtio-fs server vs C virtiofsd, on the same guest workload.

One guest script, run through five configurations, alternated round by round:

    ours-inproc          our VMM, the device in the VMM process (`type: fs`, virtio-mmio)
    ours-vhost-user      our VMM + our back-end process over vhost-user (`python -m vmm device fs`)
    virtiofsd            our VMM + C virtiofsd over vhost-user (/usr/lib/qemu/virtiofsd)
    qemu+ours-vhost-user QEMU 7.2 microvm + our back-end
    qemu+virtiofsd       QEMU 7.2 microvm + C virtiofsd

The script marks the boundaries of two workloads (and sleeps a moment after each mark, so the
host reads its counters while the guest is idle):

    probe   `probe /mnt/TAG 50 20 expect=ENOENT`: 1,000 stats of missing names, one LOOKUP each
    io      `write /mnt/TAG/big 16777216 1` then `read /mnt/TAG/big sum64`

At each mark the host reads the FUSE server's CPU time: the device's worker thread (OS name
`pyvmm-fs-TAG`, from /proc/PID/task/TID/schedstat) and, for a back-end process, the whole process
(/proc/PID/stat, every thread); the VMM's own CPU (this process, minus an in-process worker) is
read too. Requests per workload: ours count them (control socket); C virtiofsd keeps no counters,
so one extra untimed boot runs it with `-d` and counts its `opcode:` log lines between the marks
(the timed rounds run without `-d`, which costs CPU per request). The guest's requests are the
same whichever VMM drives the server, so the census of our VMM + virtiofsd serves both.

Figures: CPU us per request (min / median over rounds), the guest's latency (ns per stat from the
agent, MiB/s of the write and the read), and ratios to C virtiofsd under the same VMM measured in
the same run. JSON in bench/results/fuse_backends.json.

    python bench/fuse_backends.py [--rounds 3] [--size 16777216] [--configs a,b,...]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from devices.virtio.fs.options import FsOptions  # noqa: E402
from devices.virtio.fs.worker import os_thread_name  # noqa: E402
from devices.virtio.vhost_user.frontend import VhostUserFsOptions  # noqa: E402
from vmm.qemu import (BackendProcess, QemuGuest, VirtiofsdProcess, process_cpu_seconds,  # noqa: E402
                      thread_cpu_seconds_by_name)

TAG = "bench"
CONFIGS = ("ours-inproc", "ours-vhost-user", "virtiofsd", "qemu+ours-vhost-user", "qemu+virtiofsd")
MARKS = ("m0", "m1", "m2", "m3")
SEGMENTS = {"probe": ("m0", "m1"), "write": ("m1", "m2"), "read": ("m2", "m3"), "io": ("m1", "m3")}
BOOT_TIMEOUT = 1800


def script(size: int) -> str:
    m = f"/mnt/{TAG}"
    return "\n".join([
        "mark m0", "sleep 300",
        f"probe {m} 50 20 expect=ENOENT",
        "mark m1", "sleep 300",
        f"write {m}/big {size} 1",
        "mark m2", "sleep 300",
        f"read {m}/big sum64",
        "mark m3", "sleep 300",
        "exit 0"]) + "\n"


def mark_of(line: bytes) -> str | None:
    if b"op=mark" not in line:
        return None
    for name in MARKS:
        if f"name={name}".encode() in line:
            return name
    return None


def self_thread_cpu(comm: str) -> float:
    return thread_cpu_seconds_by_name(os.getpid(), comm) or 0.0


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Round:
    """One boot of one configuration: snapshots at the marks, the agent's steps."""

    def __init__(self, config: str) -> None:
        self.config = config
        self.snaps: dict[str, dict[str, float]] = {}
        self.steps: dict[str, Any] = {}

    def segment(self, name: str) -> dict[str, float]:
        a, b = SEGMENTS[name]
        return {k: self.snaps[b][k] - self.snaps[a][k] for k in self.snaps[b]}


def run_ours(config: str, share: Path, workdir: Path, kernel: Path, size: int,
             census: bool = False) -> tuple[Round, VirtiofsdProcess | None]:
    """Our VMM (in this process) with the device in-process, or a back-end child."""
    from vmm.control import request
    from vmm.runner import guest_config, run_guest

    rnd = Round(config)
    server: BackendProcess | VirtiofsdProcess | None = None
    ctl = str(workdir / "vmm-ctl.sock")
    options = FsOptions(source=str(share), tag=TAG)
    worker = os_thread_name(TAG)
    if config == "ours-inproc":
        device: Any = options
    elif config == "ours-vhost-user":
        server = BackendProcess(options, workdir).start()
        device = VhostUserFsOptions(str(server.socket), TAG)
    else:
        server = VirtiofsdProcess(options, workdir, debug=census).start()
        device = VhostUserFsOptions(str(server.socket), TAG)

    def snapshot() -> dict[str, float]:
        snap: dict[str, float] = {"vmm_process_s": self_cpu()}
        if config == "ours-inproc":
            snap["worker_s"] = self_thread_cpu(worker)
            snap["vmm_process_s"] -= snap["worker_s"]
            snap["requests"] = request(ctl, "stats")["devices"][f"fs:{TAG}"]["requests"]
        elif isinstance(server, BackendProcess):
            snap["worker_s"] = server.worker_cpu_seconds() or 0.0
            snap["server_process_s"] = server.cpu_seconds()
            snap["requests"] = server.stats()["requests"]
        else:
            assert server is not None
            snap["server_process_s"] = server.cpu_seconds()
            if census:
                snap["log_offset"] = server.log_path.stat().st_size
        return snap

    def on_line(line: bytes) -> None:
        name = mark_of(line)
        if name is not None:
            rnd.snaps[name] = snapshot()

    try:
        cfg = guest_config(script(size), [device], kernel=kernel, timeout=BOOT_TIMEOUT)
        result, output = run_guest(cfg, control_path=ctl, on_line=on_line)
        if result.exit_status != 0:
            raise SystemExit(f"{config}: guest failed ({result.exit_status}: {result.message})\n"
                             + output[-2000:])
        rnd.steps = {s.op: s for s in result.steps}
    finally:
        if server is not None and not census:
            server.stop()
    return rnd, server if census else None


def run_qemu(config: str, share: Path, workdir: Path, kernel: Path, size: int) -> Round:
    rnd = Round(config)
    options = FsOptions(source=str(share), tag=TAG)
    server: BackendProcess | VirtiofsdProcess
    if config == "qemu+ours-vhost-user":
        server = BackendProcess(options, workdir).start()
    else:
        server = VirtiofsdProcess(options, workdir).start()
    qemu_pid: list[int] = []

    def snapshot() -> dict[str, float]:
        snap = {"server_process_s": server.cpu_seconds(),
                "vmm_process_s": process_cpu_seconds(qemu_pid[0]) if qemu_pid else 0.0}
        if isinstance(server, BackendProcess):
            snap["worker_s"] = server.worker_cpu_seconds() or 0.0
            snap["requests"] = server.stats()["requests"]
        return snap

    def on_line(line: bytes) -> None:
        name = mark_of(line)
        if name is not None:
            rnd.snaps[name] = snapshot()

    try:
        with QemuGuest(kernel, script(size), [server], workdir, on_line=on_line) as q:
            assert q.proc is not None
            qemu_pid.append(q.proc.pid)
            status = q.wait_exit_line(BOOT_TIMEOUT)
            if status != 0:
                raise SystemExit(f"{config}: guest failed ({status})\n{q.output[-2000:]}")
            rnd.steps = {s.op: s for s in q.parser.steps}
    finally:
        server.stop()
    return rnd


def virtiofsd_census(share: Path, workdir: Path, kernel: Path, size: int) -> dict[str, dict[str, int]]:
    """Requests per segment C virtiofsd saw, from its -d log between the marks (untimed)."""
    import re

    rnd, server = run_ours("virtiofsd", share, workdir, kernel, size, census=True)
    assert server is not None
    try:
        server.stop()
        log = server.log_path.read_bytes()
    finally:
        pass
    out: dict[str, dict[str, int]] = {}
    for seg, (a, b) in SEGMENTS.items():
        chunk = log[int(rnd.snaps[a]["log_offset"]):int(rnd.snaps[b]["log_offset"])]
        counts: dict[str, int] = {}
        for m in re.finditer(rb"opcode: (\w+)", chunk):
            op = m.group(1).decode()
            counts[op] = counts.get(op, 0) + 1
        out[seg] = counts
    return out


def summarize(rounds: list[Round], census: dict[str, dict[str, int]] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for seg in ("probe", "io", "write", "read"):
        per_round = []
        for r in rounds:
            d = r.segment(seg)
            n = d.get("requests")
            if n is None and census is not None:
                n = sum(census[seg].values())
            row: dict[str, float] = {"requests": n or 0}
            for key in ("worker_s", "server_process_s", "vmm_process_s"):
                if key in d and n:
                    row[key.replace("_s", "_us_per_request")] = d[key] / n * 1e6
            per_round.append(row)
        seg_out: dict[str, Any] = {"requests": [row["requests"] for row in per_round]}
        for key in ("worker_us_per_request", "server_process_us_per_request", "vmm_process_us_per_request"):
            vals = [row[key] for row in per_round if key in row]
            if vals:
                seg_out[key] = {"min": min(vals), "median": statistics.median(vals), "all": vals}
        out[seg] = seg_out
    probe = [int(r.steps["probe"].extra["ns_per_op"]) for r in rounds]
    write = [int(r.steps["write"].ns) for r in rounds]
    read = [int(r.steps["read"].ns) for r in rounds]
    size = int(rounds[0].steps["write"].extra["size"])
    out["guest"] = {
        "probe_ns_per_stat": {"min": min(probe), "median": statistics.median(probe)},
        "write_mib_s": {"max": size / 2**20 / (min(write) / 1e9),
                        "median": size / 2**20 / (statistics.median(write) / 1e9)},
        "read_mib_s": {"max": size / 2**20 / (min(read) / 1e9),
                       "median": size / 2**20 / (statistics.median(read) / 1e9)},
    }
    return out


def server_cpu(summary: dict[str, Any], seg: str) -> float | None:
    """The FUSE server's CPU per request: the worker thread for ours (the process for a back-end
    is reported beside it), the whole process for C virtiofsd (its queue thread does the work)."""
    s = summary[seg]
    for key in ("worker_us_per_request", "server_process_us_per_request"):
        if key in s:
            return s[key]["median"]
    return None


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=16 << 20, help="bytes written and read back")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--kernel", type=Path, help="guest kernel (default: the cached project kernel)")
    args = p.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs: {', '.join(sorted(unknown))}")
    if args.kernel is None:
        from guest.build import ensure_kernel
        args.kernel = ensure_kernel(progress=lambda m: print(f"guest kernel: {m}", file=sys.stderr))
    desc = machine()
    print(f"load average before: {desc['load_before']}", file=sys.stderr)
    rounds: dict[str, list[Round]] = {c: [] for c in configs}
    census = None
    workroot = Path(tempfile.mkdtemp(prefix="pyvmm-bench-"))
    try:
        if any("virtiofsd" in c for c in configs):
            share = workroot / "census"
            share.mkdir()
            wd = workroot / "census-wd"
            wd.mkdir()
            print("virtiofsd request census (-d, untimed) ...", file=sys.stderr)
            census = virtiofsd_census(share, wd, args.kernel, args.size)
        for i in range(args.rounds):
            order = configs if i % 2 == 0 else list(reversed(configs))   # alternate
            for config in order:
                share = workroot / f"share-{i}-{config.replace('+', '-')}"
                share.mkdir()
                wd = Path(tempfile.mkdtemp(prefix="w", dir=workroot))
                started = time.monotonic()
                if config.startswith("qemu+"):
                    rnd = run_qemu(config, share, wd, args.kernel, args.size)
                else:
                    rnd, _ = run_ours(config, share, wd, args.kernel, args.size)
                rounds[config].append(rnd)
                d = rnd.segment("probe")
                print(f"round {i + 1} {config}: {time.monotonic() - started:.0f} s, probe segment "
                      f"{ {k: round(v, 4) for k, v in d.items()} }", file=sys.stderr)
                shutil.rmtree(share, ignore_errors=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    desc["load_after"] = os.getloadavg()
    summaries = {c: summarize(rs, census if "virtiofsd" in c else None) for c, rs in rounds.items()}
    ratios: dict[str, Any] = {}
    for ours, ref in (("ours-inproc", "virtiofsd"), ("ours-vhost-user", "virtiofsd"),
                      ("qemu+ours-vhost-user", "qemu+virtiofsd")):
        if ours in summaries and ref in summaries:
            ratios[f"{ours} / {ref}"] = {
                seg: (server_cpu(summaries[ours], seg) or 0) / (server_cpu(summaries[ref], seg) or 1)
                for seg in ("probe", "io")}
            ratios[f"{ours} / {ref}"]["probe_ns_per_stat"] = (
                summaries[ours]["guest"]["probe_ns_per_stat"]["median"]
                / summaries[ref]["guest"]["probe_ns_per_stat"]["median"])
    write_result("fuse_backends", {
        "machine": desc, "rounds": args.rounds, "size": args.size, "configs": configs,
        "virtiofsd_census": census, "results": summaries, "ratios_server_cpu_per_request": ratios,
        "command": "python bench/fuse_backends.py " + " ".join(sys.argv[1:])})
    print_table(summaries, ratios, desc)


def print_table(summaries: dict[str, Any], ratios: dict[str, Any], desc: dict[str, Any]) -> None:
    print(f"\nload {desc['load_before'][0]:.2f} before, {desc['load_after'][0]:.2f} after; "
          "medians (min) of CPU us per FUSE request", file=sys.stderr)
    print(f"{'config':22} {'probe: server':>16} {'probe: VMM':>12} {'io: server':>14} {'io reqs':>8} "
          f"{'ns/stat':>10} {'write MiB/s':>11} {'read MiB/s':>10}", file=sys.stderr)
    for c, s in summaries.items():
        def cell(seg: str, key: str | None = None) -> str:
            row = s[seg]  # noqa: B023 - called only within this iteration
            if key is None:
                key = "worker_us_per_request" if "worker_us_per_request" in row else "server_process_us_per_request"
            if key not in row:
                return "-"
            return f"{row[key]['median']:.0f} ({row[key]['min']:.0f})"
        g = s["guest"]
        print(f"{c:22} {cell('probe'):>16} {cell('probe', 'vmm_process_us_per_request'):>12} "
              f"{cell('io'):>14} {statistics.median(s['io']['requests']):>8.0f} "
              f"{g['probe_ns_per_stat']['median']:>10.0f} {g['write_mib_s']['median']:>11.2f} "
              f"{g['read_mib_s']['median']:>10.2f}", file=sys.stderr)
    for name, r in ratios.items():
        print(f"{name}: server CPU per request probe {r['probe']:.2f}x, io {r['io']:.2f}x; "
              f"guest ns per stat {r['probe_ns_per_stat']:.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
