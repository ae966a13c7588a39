"""bench/fuse_backends.py without a guest: the script, /proc parsing, the census and the arithmetic.

The boots themselves are the benchmark; what is checked here is everything between the raw
numbers and the JSON (a wrong segment or a wrong divisor would produce plausible-looking figures).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.fuse_backends import (SEGMENTS, Round, children_of, compare, count_opcodes, mark_of,
                                 process_tree_cpu_seconds, ratio, request_differences,
                                 schedstat_seconds, script, segment_steps, spread, summarize)
from guest.console import parse_line
from guest.script import OPS

VIRTIOFSD_LOG = b"""\
[2026-12-01 13:41:02.971900+0000] [ID: 00000004] unique: 2104, opcode: OPEN (14), nodeid: 2, insize: 48, pid: 1
[2026-12-01 13:41:02.972000+0000] [ID: 00000004]    unique: 2104, success, outsize: 32
[2026-12-01 13:41:03.045372+0000] [ID: 00000004] unique: 2106, opcode: GETATTR (3), nodeid: 2, insize: 56, pid: 1
[2026-12-01 13:41:03.114834+0000] [ID: 00000004] unique: 2108, opcode: LOOKUP (1), nodeid: 1, insize: 45, pid: 1
[2026-12-01 13:41:03.114900+0000] [ID: 00000004]    unique: 2108, error: -2 (No such file or directory), outsize: 16
[2026-12-01 13:41:03.557209+0000] [ID: 00000004] unique: 2110, opcode: LOOKUP (1), nodeid: 1, insize: 45, pid: 1
"""


def test_script_is_what_the_agent_accepts_and_marks_every_segment():
    text = script(1 << 20, 3)
    lines = text.splitlines()
    for line in lines:
        op, *args = line.split()
        args = [a for a in args if not a.startswith("expect=")]
        lo, hi = OPS[op]
        assert lo <= len(args) <= hi, line
    marks = [line.split()[1] for line in lines if line.startswith("mark ")]
    assert marks == sorted({m for seg in SEGMENTS.values() for m in seg})
    assert lines[-1] == "exit 0"
    # each small file is written, stat'ed, read and unlinked, in that order
    for op in ("write", "stat", "read", "unlink"):
        assert sum(line.startswith(f"{op} /mnt/bench/s") for line in lines) == 3
    assert lines.index("unlink /mnt/bench/s0") > lines.index("read /mnt/bench/s2 sum64")
    assert "write /mnt/bench/big 1048576 1" in lines


def test_mark_lines_are_recognised_only_for_our_marks():
    assert mark_of(b"[ 3.1] @@pyvmm step=4 op=mark result=ok errno=0 ns=100 name=m2\n") == "m2"
    assert mark_of(b"@@pyvmm step=4 op=mark result=ok errno=0 ns=100 name=other") is None
    assert mark_of(b"@@pyvmm step=5 op=stat result=ok errno=0 ns=100 name=m2") is None
    assert mark_of(b"@@pyvmm step=4 op=mark result=ok errno=0 ns=100") is None


def _steps(*bodies: str):
    return [parse_line(f"@@pyvmm step={i + 1} op={b}") for i, b in enumerate(bodies)]


def test_segment_steps_are_between_the_marks_without_sleeps():
    steps = _steps("mark result=ok errno=0 ns=1 name=m0", "sleep result=ok errno=0 ns=300",
                   "probe result=ok errno=2 ns=50 count=10 ok=10 ns_per_op=5",
                   "mark result=ok errno=0 ns=1 name=m1", "sleep result=ok errno=0 ns=300",
                   "write result=ok errno=0 ns=70 size=4096",
                   "mark result=ok errno=0 ns=1 name=m2")
    assert [s.op for s in segment_steps(steps, "m0", "m1")] == ["probe"]
    assert [s.op for s in segment_steps(steps, "m1", "m2")] == ["write"]
    assert [s.op for s in segment_steps(steps, "m0", "m2")] == ["probe", "write"]


def test_schedstat_and_children_lines():
    assert schedstat_seconds("1500000000 42 7\n") == 1.5
    assert children_of("12 345 \n") == [12, 345]
    assert children_of("") == []


def test_process_tree_cpu_counts_a_child_process():
    """C virtiofsd serves from a forked child: the tree sum must include children's threads."""
    burn = ("import sys, time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\nsys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"done\n"
        tree = process_tree_cpu_seconds(os.getpid())
        own = 0.0
        for tid in os.listdir(f"/proc/{os.getpid()}/task"):
            with open(f"/proc/{os.getpid()}/task/{tid}/schedstat") as f:
                own += schedstat_seconds(f.read())
        assert process_tree_cpu_seconds(child.pid) >= 0.29
        assert tree - own >= 0.25      # own only grew since `tree` was read
    finally:
        child.stdin.close()
        child.wait()


def test_census_counts_request_lines_only():
    assert count_opcodes(VIRTIOFSD_LOG) == {"OPEN": 1, "GETATTR": 1, "LOOKUP": 2}
    assert count_opcodes(b"") == {}


def test_spread_and_ratio():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "all": [3.0, 1.0, 2.0, 10.0]}
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0) is None and ratio(None, 1.0) is None


def _round(config: str, cpu: dict[str, list[float]], ops: list[dict[str, int]] | None,
           probe_ns: int = 20_000_000) -> Round:
    """A round with snapshots at m0..m4: `cpu[key][i]` is counter `key` at mark i."""
    r = Round(config)
    for i in range(5):
        snap = {k: v[i] for k, v in cpu.items()}
        if ops is not None:
            snap["ops"] = ops[i]
            snap["requests"] = sum(ops[i].values())
        r.snaps[f"m{i}"] = snap
    r.steps = _steps("mark result=ok errno=0 ns=1 name=m0",
                     f"probe result=ok errno=2 ns=1 count=1000 ok=1000 ns_per_op={probe_ns}",
                     "mark result=ok errno=0 ns=1 name=m1",
                     "write result=ok errno=0 ns=1000 size=4096", "stat result=ok errno=0 ns=10",
                     "read result=ok errno=0 ns=300 size=4096", "unlink result=ok errno=0 ns=20",
                     "mark result=ok errno=0 ns=1 name=m2",
                     "write result=ok errno=0 ns=2000000000 size=2097152",
                     "mark result=ok errno=0 ns=1 name=m3",
                     "read result=ok errno=0 ns=500000000 size=2097152",
                     "mark result=ok errno=0 ns=1 name=m4")
    return r


def test_summary_divides_each_segment_by_its_own_requests_and_compares_with_the_census():
    ops = [{"INIT": 1}, {"INIT": 1, "LOOKUP": 1000}, {"INIT": 1, "LOOKUP": 1200, "CREATE": 200},
           {"INIT": 1, "LOOKUP": 1200, "CREATE": 200, "WRITE": 16, "GETXATTR": 1},
           {"INIT": 1, "LOOKUP": 1200, "CREATE": 200, "WRITE": 16, "GETXATTR": 1, "READ": 16}]
    ours = summarize([_round("ours", {"server_s": [0, 0.2, 0.3, 0.31, 0.32], "worker_s": [0, 0.1, 0.15, 0.16, 0.17],
                                      "vmm_s": [0, 1, 2, 3, 4]}, ops),
                      _round("ours", {"server_s": [1, 1.4, 1.5, 1.51, 1.52], "worker_s": [0, 0.1, 0.1, 0.1, 0.1],
                                      "vmm_s": [0, 1, 2, 3, 4]}, ops, probe_ns=30_000_000)], None, 2 << 20)
    assert ours["probe"]["requests"]["median"] == 1000
    assert ours["probe"]["ops"] == {"LOOKUP": 1000}
    assert ours["probe"]["server_us_per_request"]["min"] == pytest.approx(200)
    assert ours["probe"]["server_us_per_request"]["median"] == pytest.approx(300)
    assert ours["small"]["requests"]["median"] == 400
    assert ours["io"]["ops"] == {"GETXATTR": 1, "READ": 16, "WRITE": 16}
    assert ours["io"]["server_us_per_request"]["min"] == pytest.approx(0.02 / 33 * 1e6)
    assert ours["guest"]["probe_ns_per_stat"]["median"] == 25_000_000
    assert ours["guest"]["write_mib_s"]["min"] == pytest.approx(1.0)
    assert ours["guest"]["read_mib_s"]["min"] == pytest.approx(4.0)
    assert ours["guest"]["small_write_ns"]["median"] == 1000

    census = {"probe": {"LOOKUP": 1000}, "small": {"LOOKUP": 200, "CREATE": 200},
              "write": {"WRITE": 16, "GETXATTR": 1}, "read": {"READ": 16},
              "io": {"WRITE": 16, "GETXATTR": 1, "READ": 16}}
    cpu = {"server_s": [0, 0.05, 0.1, 0.11, 0.12], "vmm_s": [0, 1, 2, 3, 4]}
    ref = summarize([_round("virtiofsd", cpu, None), _round("virtiofsd", cpu, None)], census, 2 << 20)
    assert ref["probe"]["requests_from"] == "virtiofsd -d census"
    assert ref["probe"]["server_us_per_request"]["median"] == pytest.approx(50)
    assert "worker_us_per_request" not in ref["probe"]

    r = compare(ours, ref)
    assert r["probe"]["server_us_per_request"] == pytest.approx(6.0)
    assert r["probe"]["server_us_per_request_min"] == pytest.approx(4.0)
    assert r["probe"]["worker_vs_server_us_per_request"] == pytest.approx(2.0)
    assert r["probe"]["request_differences"] == {}
    assert r["small"]["requests"] == pytest.approx(1.0)
    assert r["small"]["request_differences"] == {}
    assert r["guest"]["probe_ns_per_stat"] == pytest.approx(1.25)


def test_request_differences_name_each_opcode_that_differs():
    assert request_differences({"LOOKUP": 10, "GETXATTR": 5}, {"LOOKUP": 10, "FLUSH": 2}) == {
        "FLUSH": {"ours": 0, "virtiofsd": 2}, "GETXATTR": {"ours": 5, "virtiofsd": 0}}


def test_raw_rounds_round_trip_through_json():
    """--from-raw re-summarizes saved rounds: the same figures as from the live rounds."""
    import json

    ops = [{"LOOKUP": i * 10} for i in range(5)]
    live = [_round("ours", {"server_s": [0, 1, 2, 3, 4], "vmm_s": [0, 1, 2, 3, 4]}, ops)]
    saved = [Round.from_json(json.loads(json.dumps(r.to_json()))) for r in live]
    assert summarize(saved, None, 2 << 20) == summarize(live, None, 2 << 20)


def test_markdown_table_has_a_row_per_workload_and_front_end():
    from bench.fuse_backends import markdown

    ops = [{"LOOKUP": i * 10} for i in range(5)]
    census = {seg: {"LOOKUP": 10 if seg in ("probe", "small", "write", "read") else 20} for seg in SEGMENTS}
    ours = summarize([_round("ours", {"server_s": [0, 1, 2, 3, 4], "vmm_s": [0, 1, 2, 3, 4]}, ops)], None, 2 << 20)
    ref = summarize([_round("ref", {"server_s": [0, .5, 1, 1.5, 2], "vmm_s": [0, 1, 2, 3, 4]}, None)], census, 2 << 20)
    text = markdown({"ours-inproc": ours, "virtiofsd": ref}, {"ours-inproc / virtiofsd": compare(ours, ref)})
    rows = [line for line in text.splitlines() if line.startswith("| probe") or line.startswith("| small")
            or line.startswith("| io")]
    assert len(rows) == 3
    assert ("| probe | our VMM, device in-process | 10 / 10 | 100000 (100000) | - | 50000 (50000) "
            "| **2.00** (2.00) |") in rows
