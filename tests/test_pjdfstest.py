"""pjdfstest, the POSIX file-system test suite, over `python -m vmm fuse-mount` of a fresh share.

A suite we did not write checks the FUSE server and the passthrough through the host kernel's
own FUSE client, at native speed (8,798 subtests in about 2.5 minutes on 2 cores).  The test fails
on any failing subtest that is not a reviewed deviation in `tests/pjdfstest_expected.py`; the
report lists the unexpected failures first, with what each subtest tried.

pjdfstest is built once by `.ci/setup.sh` (or here, on first use) into ~/.cache/pyvmm/pjdfstest.
"""

from __future__ import annotations

import os
import warnings

import pytest

from tests.pjdfstest_expected import BUG, CAUSES, EXPECTED, PERMISSIVE_OPTIONS
from tests.pjdfstest_support import compare, ensure_pjdfstest, run_prove, start_fuse_mount

if not os.path.exists("/dev/fuse"):
    pytest.skip("!!! /dev/fuse is absent: pjdfstest NOT RUN (modprobe fuse)",
                allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("!!! not root: pjdfstest needs root (it switches uids and mounts)",
                allow_module_level=True)

#: prove -j: the test scripts fork a lot and sleep (timestamp checks); the server is one process.
#: 2 jobs: 133 s, 4: 95 s, 8: 101 s for the default run here (the same ~110 s of CPU each time).
JOBS = 4
#: The runs: fuse-mount options, and the deviations each may show.  The default options keep the
#: safe policies, so policy deviations are expected; the permissive ones restore exact POSIX
#: behaviour, so only the listed bugs may remain.
RUNS = {"default": (("cache=never",), EXPECTED)}
if PERMISSIVE_OPTIONS is not None:
    RUNS["permissive"] = (("cache=never", *PERMISSIVE_OPTIONS),
                          tuple(d for d in EXPECTED if d.cause.kind == BUG))


@pytest.mark.parametrize("run", sorted(RUNS))
def test_pjdfstest_has_only_the_listed_deviations(tmp_path, run):
    options, deviations = RUNS[run]
    tree = ensure_pjdfstest(progress=lambda msg: print(f"pjdfstest: {msg}", flush=True))
    fm = start_fuse_mount(tmp_path, options)
    try:
        results, raw, seconds = run_prove(tree, fm.mountpoint, jobs=JOBS, timeout=600)
    finally:
        status = fm.stop()
    (tmp_path / "prove.out").write_text(raw)
    cmp = compare(results, deviations)
    report = f"[{run}: -o {' -o '.join(options)}] " + cmp.report(seconds, CAUSES)
    print(report)
    print(f"(prove's full output: {tmp_path / 'prove.out'})")

    all_files = sorted(p.relative_to(tree / "tests").as_posix()
                       for p in (tree / "tests").rglob("*.t"))
    assert sorted(results) == all_files, "prove did not report every test file"
    assert status == 0, f"fuse-mount did not unmount cleanly:\n{fm.log()}"
    assert not cmp.unexpected and not cmp.not_run, report
    if cmp.now_passing:
        warnings.warn("pjdfstest: listed deviations pass now; delete them from "
                      "tests/pjdfstest_expected.py:\n" + report, stacklevel=1)
