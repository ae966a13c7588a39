"""Shared bits for the benchmarks: where results go and how a guest is booted for a measurement."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """Each benchmark prints its JSON and also keeps it in bench/results/NAME.json."""
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "host": platform.node(), "kvm_pvm": Path("/sys/module/kvm_pvm").exists(), **payload}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps(payload, indent=2, sort_keys=True)
    path.write_text(text + "\n")
    print(text)
    return path


def boot(script: str, *, shares=(), vcpus: int = 1, memory_mib: int = 128):
    """Boot the project kernel with an agent script; returns the RunResult."""
    from vmm.runner import guest_config, run_guest
    result, _ = run_guest(guest_config(script, shares, vcpus=vcpus, memory_mib=memory_mib))
    if result.exit_status != 0:
        raise SystemExit(f"benchmark guest failed: {result.message or result.exit_status}")
    return result
