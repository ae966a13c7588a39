"""Small helpers shared by the end-to-end tests (the fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

from devices.virtio.fs.options import FsOptions


def share(path: Path, tag: str = "share", **kw) -> FsOptions:
    return FsOptions(source=str(path), tag=tag, **kw)


def steps_by_op(result, op: str):
    return [s for s in result.steps if s.op == op]


def fs_metrics(result, tag: str = "share") -> dict:
    return result.metrics[f"fs:{tag}"]


def assert_ok(result):
    assert result.exit_status == 0, (result.message, result.output[-3000:])
    failed = [s for s in result.steps if s.result != "ok"]
    assert not failed, failed
    assert not result.console.parser.faults, result.console.parser.faults


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}
