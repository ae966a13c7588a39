"""Shared bits for the benchmarks: where results go and how a guest is booted for a measurement."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the figures were measured on: they mean little without it (kvm_pvm emulates the
    guest kernel, so guest-side times here are ~100x those on hardware KVM)."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "kvm_pvm": Path("/sys/module/kvm_pvm").exists(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def spread(values: list[float]) -> dict:
    """min / median / max of repeated measurements (min is the least disturbed one)."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


def write_result(name: str, payload: dict) -> Path:
    """Each benchmark prints its JSON and also keeps it in bench/results/NAME.json (dated, with
    the machine it ran on)."""
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "host": platform.node(), "kvm_pvm": Path("/sys/module/kvm_pvm").exists(),
               "machine": machine(), **payload}
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
