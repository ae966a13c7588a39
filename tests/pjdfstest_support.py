"""Build (once) and locate pjdfstest, the POSIX file-system test suite, outside the repository.

The shared copy (``../shared/third_party/pjdfstest`` beside the checkout) is read-only, so the
tree is copied into ``<cache>/pjdfstest/<hash>/`` and built there (``autoreconf -ifs &&
./configure && make pjdfstest``).  ``<hash>`` covers every source file, so an unchanged copy is
never rebuilt and a changed one gets its own directory.  ``<cache>`` is the project cache
(``$PYVMM_CACHE`` or ``~/.cache/pyvmm``), the same one the guest kernel uses.

Overrides: ``PYVMM_PJDFSTEST_SRC`` names another source tree; ``PYVMM_PJDFSTEST`` names an
already built tree (the directory holding ``pjdfstest`` and ``tests/``).

Run as a script (``.ci/setup.sh`` does) to build it and print the built tree's path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: ``../shared/third_party/pjdfstest`` relative to the checkout: /work/main and every worktree
#: under /work see the same shared copy.
DEFAULT_SOURCE = REPO.parent / "shared" / "third_party" / "pjdfstest"
BUILD_TOOLS = ("autoreconf", "autoconf", "automake", "make", "cc")


class PjdfstestUnavailable(RuntimeError):
    """pjdfstest cannot be built here (no source, no build tools, or the build failed)."""


def cache_root() -> Path:
    env = os.environ.get("PYVMM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyvmm"


def source_dir() -> Path:
    env = os.environ.get("PYVMM_PJDFSTEST_SRC")
    return Path(env) if env else DEFAULT_SOURCE


def _source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and ".git" not in p.parts)


def source_hash(src: Path) -> str:
    """Short digest of every file's relative path and bytes (the cache key)."""
    h = hashlib.sha256()
    for p in _source_files(src):
        rel = p.relative_to(src).as_posix().encode()
        data = p.read_bytes()
        h.update(len(rel).to_bytes(4, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def is_built(tree: Path) -> bool:
    binary = tree / "pjdfstest"
    return binary.is_file() and os.access(binary, os.X_OK) and (tree / "tests" / "conf").is_file()


def built_dir(src: Path | None = None) -> Path:
    """Where the build of ``src`` lives (whether or not it exists yet)."""
    src = src or source_dir()
    return cache_root() / "pjdfstest" / source_hash(src)


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "pjdfstest.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path, log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    r = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise PjdfstestUnavailable(f"`{' '.join(cmd)}` failed with status {r.returncode} "
                                   f"(log: {log.name})")


def ensure_pjdfstest(progress=None) -> Path:
    """The built pjdfstest tree (directory with ``pjdfstest`` and ``tests/``); builds it if needed."""
    env = os.environ.get("PYVMM_PJDFSTEST")
    if env:
        tree = Path(env)
        if not is_built(tree):
            raise PjdfstestUnavailable(f"PYVMM_PJDFSTEST={env} holds no built pjdfstest")
        return tree
    src = source_dir()
    if not (src / "pjdfstest.c").is_file():
        raise PjdfstestUnavailable(f"no pjdfstest source at {src} (set PYVMM_PJDFSTEST_SRC)")
    tree = built_dir(src)
    if is_built(tree):
        return tree
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if missing:
        raise PjdfstestUnavailable(f"cannot build pjdfstest: {', '.join(missing)} missing "
                                   "(run .ci/setup.sh: it installs autoconf and automake)")
    root = tree.parent
    with _lock(root):
        if is_built(tree):
            return tree
        if progress:
            progress(f"building pjdfstest from {src} into {tree}")
        work = Path(tempfile.mkdtemp(prefix=f"{tree.name}.", suffix=".tmp", dir=root))
        try:
            shutil.copytree(src, work, dirs_exist_ok=True, symlinks=True)
            for p in [work, *work.rglob("*")]:   # the shared copy is read-only: make ours writable
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | stat.S_IWUSR)
            with open(root / f"{tree.name}.build.log", "w") as log:
                _run(["autoreconf", "-ifs"], work, log)
                _run(["./configure"], work, log)
                _run(["make", "pjdfstest"], work, log)
            if not is_built(work):
                raise PjdfstestUnavailable(f"the build in {work} produced no pjdfstest binary")
            work.chmod(0o755)
            os.replace(work, tree)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return tree


# --------------------------------------------------------------------------------------------
# Running it and reading the results

@dataclass
class FileResult:
    """One test file's results, from its TAP."""

    name: str                       # relative to tests/, e.g. "chmod/12.t"
    planned: int | None = None      # from "1..N" (None: no plan printed)
    passed: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)   # subtest -> what it says it tried

    def missing(self) -> list[int]:
        """Planned subtests that printed no result (the script died or stopped early)."""
        if self.planned is None:
            return []
        seen = self.passed | set(self.failed)
        return [n for n in range(1, self.planned + 1) if n not in seen]

    def failures(self) -> dict[int, str]:
        """Every subtest that did not pass: failed ones and planned ones never reported."""
        out = dict(self.failed)
        for n in self.missing():
            out[n] = "no result (the test script stopped before it)"
        if self.planned is None and not self.passed and not self.failed:
            out[0] = "no TAP at all (the test script did not run)"
        return out

    @property
    def total(self) -> int:
        return self.planned if self.planned is not None else len(self.passed) + len(self.failed)


_HEADER = re.compile(r"^(?P<path>\S+\.t) \.+ ?(?P<rest>.*)$")
_PLAN = re.compile(r"^1\.\.(\d+)")
_RESULT = re.compile(r"^(?P<not>not )?ok (?P<n>\d+)(?P<desc>.*)$")


def parse_prove_verbose(text: str, tests_dir: Path | str) -> dict[str, FileResult]:
    """Results per test file from ``prove -v`` output (also with ``-j``, which prints each
    file's TAP in one block).  A ``# TODO`` result counts as passed, as prove counts it."""
    prefix = str(tests_dir).rstrip("/") + "/"
    results: dict[str, FileResult] = {}
    cur: FileResult | None = None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m and m.group("path").startswith(prefix):
            name = m.group("path")[len(prefix):]
            cur = results.setdefault(name, FileResult(name))
            line = m.group("rest")
            if not line:
                continue
        if cur is None:
            continue
        m = _PLAN.match(line)
        if m:
            cur.planned = int(m.group(1))
            continue
        m = _RESULT.match(line)
        if m:
            n = int(m.group("n"))
            desc = m.group("desc")
            if m.group("not") and "# TODO" not in desc:
                cur.failed[n] = desc.lstrip(" -")
            else:
                cur.passed.add(n)
    return results


def run_prove(tree: Path, cwd: Path, *, subset: Iterable[str] = (), jobs: int = 1,
              timeout: float = 900) -> tuple[dict[str, FileResult], str, float]:
    """``prove -r -v`` over ``tree/tests`` (or the listed files/dirs) with ``cwd`` as the file
    system under test; returns (results per file, raw output, seconds)."""
    tests = tree / "tests"
    targets = [str(tests / s) for s in subset] or [str(tests)]
    cmd = ["prove", "-r", "-v", f"-j{jobs}", *targets]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout, text=True, errors="replace")
    seconds = time.monotonic() - t0
    return parse_prove_verbose(r.stdout, tests), r.stdout, seconds


def ranges(numbers: Iterable[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7" (prove's own notation)."""
    out: list[str] = []
    nums = sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out)


def parse_ranges(text: str) -> set[int]:
    """"1-3, 7" -> {1, 2, 3, 7}."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        out.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out


# --------------------------------------------------------------------------------------------
# Comparing a run with the reviewed list of expected deviations

_GENERATED_NAME = re.compile(r"pjdfstest_[0-9a-f]{32}")
_LONG_NAME = re.compile(r"[0-9a-f]{64,}")


def shorten(desc: str, limit: int = 240) -> str:
    """A subtest's description with pjdfstest's generated names made readable."""
    desc = _GENERATED_NAME.sub("N", desc)
    desc = _LONG_NAME.sub(lambda m: f"<{len(m.group())}-char name>", desc)
    return desc if len(desc) <= limit else desc[:limit] + "..."


@dataclass
class Comparison:
    """A run against the expected deviations (``tests/pjdfstest_expected.py``)."""

    results: dict[str, FileResult]
    unexpected: dict[str, dict[int, str]] = field(default_factory=dict)
    expected: dict[str, dict[str, set[int]]] = field(default_factory=dict)  # cause -> file -> n
    now_passing: dict[str, set[int]] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)   # listed files that printed nothing

    @property
    def subtests(self) -> int:
        return sum(r.total for r in self.results.values())

    @property
    def failing(self) -> int:
        return sum(len(r.failures()) for r in self.results.values())

    def report(self, seconds: float | None = None, causes=None) -> str:
        failing_files = sum(1 for r in self.results.values() if r.failures())
        n_unexp = sum(len(v) for v in self.unexpected.values())
        head = (f"pjdfstest: {len(self.results)} files, {self.subtests} subtests, "
                f"{self.failing} failing in {failing_files} files "
                f"({self.failing - n_unexp} expected, {n_unexp} unexpected)")
        if seconds is not None:
            head += f", {seconds:.0f} s"
        lines = [head]
        if self.unexpected:
            lines.append(f"UNEXPECTED failures ({n_unexp} subtests in {len(self.unexpected)} "
                         "files; not in tests/pjdfstest_expected.py):")
            for name in sorted(self.unexpected):
                fails = self.unexpected[name]
                lines.append(f"  {name}: {ranges(fails)}")
                for n in sorted(fails)[:8]:
                    lines.append(f"      {n}: {shorten(fails[n])}")
                if len(fails) > 8:
                    lines.append(f"      ... and {len(fails) - 8} more")
        if self.not_run:
            lines.append(f"listed files that did not run: {', '.join(self.not_run)}")
        if self.now_passing:
            lines.append("listed as deviations but PASSING now (delete them from the list):")
            for name in sorted(self.now_passing):
                lines.append(f"  {name}: {ranges(self.now_passing[name])}")
        if self.expected:
            lines.append("expected deviations:")
            for key in sorted(self.expected):
                files = self.expected[key]
                n = sum(len(v) for v in files.values())
                cause = (causes or {}).get(key)
                what = f" ({cause.kind}): {cause.summary}" if cause is not None else ""
                lines.append(f"  {key}{what}: {n} subtests in {len(files)} files")
        return "\n".join(lines)


def compare(results: dict[str, FileResult], deviations) -> Comparison:
    """Sort every failing subtest into expected (listed, with its cause) or unexpected, and
    find listed subtests that pass now.  ``deviations``: objects with ``file``, ``subtests``
    (range notation) and ``cause.key``."""
    listed: dict[str, dict[int, str]] = {}
    for d in deviations:
        for n in parse_ranges(d.subtests):
            listed.setdefault(d.file, {})[n] = d.cause.key
    cmp = Comparison(results)
    for name, r in results.items():
        want = listed.get(name, {})
        fails = r.failures()
        for n, desc in fails.items():
            key = want.get(n)
            if key is None:
                cmp.unexpected.setdefault(name, {})[n] = desc
            else:
                cmp.expected.setdefault(key, {}).setdefault(name, set()).add(n)
        passing = set(want) - set(fails)
        if passing:
            cmp.now_passing[name] = passing
    cmp.not_run = sorted(set(listed) - set(results))
    return cmp


# --------------------------------------------------------------------------------------------
# A fresh share mounted with `python -m vmm fuse-mount` (a real subprocess)

def mount_fstype(mountpoint: Path | str) -> str | None:
    """The file-system type mounted exactly at ``mountpoint`` (None if nothing is)."""
    target = os.path.realpath(mountpoint)
    fstype = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                fstype = right.split()[0]   # the last (topmost) mount wins
    return fstype


@dataclass
class FuseMountProcess:
    """A running ``python -m vmm fuse-mount SOURCE MOUNTPOINT`` and its files."""

    proc: subprocess.Popen
    source: Path
    mountpoint: Path
    metrics_path: Path
    log_path: Path

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        """Send ``sig`` (SIGTERM by default) and wait for the process; returns its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_fuse_mount(workdir: Path, options: Iterable[str] = (), *,
                     python: str = sys.executable, timeout: float = 20,
                     extra_args: Iterable[str] = ()) -> FuseMountProcess:
    """Mount a fresh empty share ``workdir/src`` on ``workdir/mnt``; returns once it is mounted
    and the command said it is serving."""
    src, mnt = workdir / "src", workdir / "mnt"
    src.mkdir(parents=True, exist_ok=True)
    mnt.mkdir(parents=True, exist_ok=True)
    metrics, log = workdir / "metrics.json", workdir / "fuse-mount.log"
    cmd = [python, "-m", "vmm", "fuse-mount", str(src), str(mnt), "--metrics", str(metrics),
           *[a for o in options for a in ("--option", o)], *extra_args]
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    fm = FuseMountProcess(proc, src, mnt, metrics, log)
    deadline = time.monotonic() + timeout
    while mount_fstype(mnt) != "fuse.pyvmm" or "pyvmm: serving" not in fm.log():
        if proc.poll() is not None:
            raise RuntimeError(f"fuse-mount exited with {proc.returncode} before mounting:\n"
                               f"{fm.log()}")
        if time.monotonic() > deadline:
            fm.stop()
            raise RuntimeError(f"{mnt} not mounted after {timeout} s:\n{fm.log()}")
        time.sleep(0.05)
    return fm


def summary(results: dict[str, FileResult]) -> str:
    """prove-like summary of the failing files: subtest ranges and the first failure's text."""
    lines = []
    for name in sorted(results):
        fails = results[name].failures()
        if fails:
            first = min(fails)
            lines.append(f"{name}: {len(fails)}/{results[name].total} failed: {ranges(fails)}")
            lines.append(f"    first: {first}: {fails[first][:200]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``build`` (default): build and print the tree.  ``run [--jobs N] [--option k=v]...
    [FILE_OR_DIR...]``: run pjdfstest over a fresh fuse-mount share and print the failures."""
    import argparse
    action = "build"
    if argv and argv[0] in ("build", "run"):
        action, argv = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"pjdfstest_support.py {action}")
    p.add_argument("subset", nargs="*", help="test files or directories under tests/")
    p.add_argument("--jobs", "-j", type=int, default=2)
    p.add_argument("--option", "-o", action="append", default=[])
    p.add_argument("--raw", type=Path, help="also write prove's output here")
    args = p.parse_args(argv)
    try:
        tree = ensure_pjdfstest(progress=lambda m: print(f"pjdfstest: {m}", file=sys.stderr))
    except PjdfstestUnavailable as e:
        print(f"pjdfstest: error: {e}", file=sys.stderr)
        return 1
    if action == "build":
        print(tree)
        return 0
    with tempfile.TemporaryDirectory(prefix="pyvmm-pjdfstest.") as tmp:
        fm = start_fuse_mount(Path(tmp), args.option)
        try:
            results, raw, seconds = run_prove(tree, fm.mountpoint, subset=args.subset,
                                              jobs=args.jobs)
        finally:
            status = fm.stop()
        if args.raw:
            args.raw.write_text(raw)
    if str(REPO) not in sys.path:      # run as a script: make `tests.` importable
        sys.path.insert(0, str(REPO))
    from tests.pjdfstest_expected import CAUSES, EXPECTED
    print(summary(results))
    listed = [d for d in EXPECTED if d.file in results] if args.subset else EXPECTED
    print(compare(results, listed).report(seconds, CAUSES))
    print(f"fuse-mount exit status {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
