"""ruff and mypy over the tree, as part of the test suite (so the README's one test command and CI
run them): a lint finding or a type error fails the suite with the tool's own report.

Both tools take their configuration from pyproject.toml ([tool.ruff], [tool.mypy]); mypy keeps
its cache in .mypy_cache, so a run after the first one costs a few seconds. The planted-error
tests show each check can fail: the same configuration reports a file with a known mistake.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m TOOL ...` with this interpreter (the venv's), from the repository root."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ruff_finds_nothing() -> None:
    r = _run("ruff", "check", "--no-fix", "--output-format", "concise", ".")
    assert r.returncode == 0, f"ruff check:\n{r.stdout}{r.stderr}"


def test_mypy_finds_nothing() -> None:
    r = _run("mypy")
    assert r.returncode == 0, f"mypy:\n{r.stdout}{r.stderr}"


def test_ruff_reports_a_planted_finding(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(x):\n    return f'{x}' + f'no placeholder'\n")
    r = _run("ruff", "check", "--no-fix", "--no-cache", "--output-format", "concise",
             "--config", str(PYPROJECT), str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "F401" in r.stdout and "F541" in r.stdout, r.stdout


def test_mypy_reports_a_planted_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    # An unannotated function: only --check-untyped-defs (from the configuration) looks inside.
    bad.write_text("def f():\n    n: int = 0\n    n = 'text'\n    return n\n")
    r = _run("mypy", "--config-file", str(PYPROJECT), str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[assignment]" in r.stdout, r.stdout


#: Loggers named otherwise than after their module, each with the reason (kept in sync by the test).
LOGGER_EXCEPTIONS = {
    # The device keeps the worker's throttle so it spans activations; lines keep the worker's name.
    "devices/virtio/fs/device.py": "LogThrottle(logging.getLogger(FsWorker.__module__))",
}


def test_one_logger_convention() -> None:
    """Every module logs through ``logger = logging.getLogger(__name__)``, so a logger's name says
    where a line comes from and `-v`/logging config can address a package by its dotted name."""
    bad = []
    paths = [p for pkg in ("kvm_sys", "vmm", "devices", "fuse", "guest", "bench")
             for p in sorted((ROOT / pkg).rglob("*.py"))]
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "getLogger(" not in line or line == "logger = logging.getLogger(__name__)":
                continue
            if LOGGER_EXCEPTIONS.get(rel, "\0") not in line:
                bad.append(f"{rel}:{n}: {line.strip()}")
    assert not bad, "loggers not named `logger = logging.getLogger(__name__)`:\n" + "\n".join(bad)
