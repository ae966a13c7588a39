"""vmm.sweep without a guest: option grids, the guest-time rule, the table and the plot."""

from __future__ import annotations

import json

import pytest

from guest.console import parse_line
from vmm.config import ConfigError
from vmm.sweep import (SweepRun, grid, guest_ns_per_op, markdown, parse_axis, plot,
                       summarize)


def test_axes_are_parsed_and_checked_like_device_options():
    assert parse_axis("negative_timeout", "0, 0.1,60") == [0.0, 0.1, 60.0]
    assert parse_axis("cache", "never,always") == ["never", "always"]
    for bad in ("0,-1", "0,,1", "inf", "1,1"):
        with pytest.raises(ConfigError, match="--negative-timeout"):
            parse_axis("negative_timeout", bad)
    with pytest.raises(ConfigError, match="--cache"):
        parse_axis("cache", "never,sometimes")


def test_grid_is_every_combination():
    points = grid({"negative_timeout": [0.0, 1.0], "cache": ["never", "auto", "always"]})
    assert len(points) == 6
    assert {"negative_timeout": 1.0, "cache": "always"} in points


def test_guest_time_counts_repetitions_and_skips_setup():
    steps = [parse_line(line) for line in (
        "@@pyvmm step=1 op=mount result=ok errno=0 ns=900000",
        "@@pyvmm step=2 op=probe result=ok errno=2 ns=1000000 count=100 ok=0 ns_per_op=10000",
        "@@pyvmm step=3 op=stat result=ok errno=0 ns=30000 size=1 mode=0100644 nlink=1 mtime=0",
    )]
    assert guest_ns_per_op(steps) == (1000000 + 30000) / 101
    assert guest_ns_per_op(steps[:1]) is None


def _run(nt, cache, repeat, lookups, ns):
    return SweepRun(options={"negative_timeout": nt, "cache": cache}, repeat=repeat,
                    exit_status=0, lookups=lookups, requests=lookups + 3, guest_ns_per_op=ns,
                    ops={"LOOKUP": lookups})


def test_summary_table_and_plot(tmp_path):
    runs = [_run(0.0, "auto", 0, 1000, 20000.0), _run(0.0, "auto", 1, 1002, 30000.0),
            _run(60.0, "auto", 0, 50, 2000.0), _run(60.0, "auto", 1, 50, 1000.0),
            _run(0.0, "never", 0, 1000, 25000.0), _run(60.0, "never", 0, 50, 1500.0)]
    rows = summarize(runs)
    by = {(r["options"]["negative_timeout"], r["options"]["cache"]): r for r in rows}
    assert by[(0.0, "auto")]["lookups_median"] == 1001 and by[(0.0, "auto")]["runs"] == 2
    assert by[(60.0, "auto")]["guest_us_per_op_min"] == 1.0
    table = markdown(rows, ["negative_timeout", "cache"])
    assert "| 60.0 | auto | 50 |" in table and table.count("\n") == 2 + len(rows)
    png = tmp_path / "sweep.png"
    plot(rows, {"negative_timeout": [0.0, 60.0], "cache": ["auto", "never"]}, png, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    json.dumps(rows)  # the summary is what sweep.json stores
