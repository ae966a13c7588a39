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

from tests.pjdfstest_expected import CAUSES, EXPECTED
from tests.pjdfstest_support import (compare, ensure_pjdfstest, run_prove, start_fuse_mount)

if not os.path.exists("/dev/fuse"):
    pytest.skip("!!! /dev/fuse is absent: pjdfstest NOT RUN (modprobe fuse)",
                allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("!!! not root: pjdfstest needs root (it switches uids and mounts)",
                allow_module_level=True)

#: prove -j: the test scripts fork a lot; the server is one process.  Two jobs fill 2 cores.
JOBS = 2


def test_pjdfstest_has_only_the_listed_deviations(tmp_path):
    tree = ensure_pjdfstest(progress=lambda msg: print(f"pjdfstest: {msg}", flush=True))
    fm = start_fuse_mount(tmp_path, ["cache=never"])
    try:
        results, raw, seconds = run_prove(tree, fm.mountpoint, jobs=JOBS, timeout=600)
    finally:
        status = fm.stop()
    (tmp_path / "prove.out").write_text(raw)
    cmp = compare(results, EXPECTED)
    report = cmp.report(seconds, CAUSES)
    print(report)
    print(f"(prove's full output: {tmp_path / 'prove.out'})")

    all_files = sorted(p.relative_to(tree / "tests").as_posix()
                       for p in (tree / "tests").rglob("*.t"))
    assert sorted(results) == all_files, "prove did not report every test file"
    assert status == 0, f"fuse-mount did not unmount cleanly:\n{fm.log()}"
    assert not cmp.unexpected and not cmp.not_run, report
    if cmp.now_passing:
        warnings.warn("pjdfstest: listed deviations pass now; delete them from "
                      "tests/pjdfstest_expected.py:\n" + report)
