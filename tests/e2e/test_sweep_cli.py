"""``python -m vmm sweep`` end to end: a two-point grid boots two guests and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_sweep_writes_json_table_and_plot(kernel, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "vmm", "sweep", "--kernel", str(kernel),
                        "--exec", "stat /mnt/data/missing x8 expect=ENOENT",
                        "--negative-timeout", "0,60", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[2/2]" in r.stderr                        # progress while it runs
    data = json.loads((out / "sweep.json").read_text())
    lookups = {p["options"]["negative_timeout"]: p["lookups_median"] for p in data["points"]}
    assert lookups == {0.0: 8, 60.0: 1}               # counted by the device, per point
    assert all(p["guest_us_per_op_median"] > 0 for p in data["points"])
    assert "| 60.0 | auto | 1 |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
