"""The pjdfstest helpers without running pjdfstest: TAP parsing, ranges, the comparison with the
expected deviations, and the reviewed list itself."""

from __future__ import annotations

from pathlib import Path

from tests import pjdfstest_expected as expected
from tests.pjdfstest_support import (DEFAULT_SOURCE, compare, parse_prove_verbose, parse_ranges,
                                     ranges, shorten, source_hash)

T = "/cache/pjdfstest/tests"
VERBOSE = f"""\
{T}/chmod/00.t .......... 
1..5
ok 1
not ok 2 - tried 'chmod pjdfstest_0123456789abcdef0123456789abcdef 0777', expected 0, got EPERM
ok 3 # TODO not on this fs
not ok 4 # TODO known to fail here
not ok 5
Failed 2/5 subtests 
{T}/open/02.t ... 1..4
ok 1
ok 2
{T}/rmdir/00.t .. 
ok
{T}/mkdir/00.t .. 
1..2
ok 1
ok 2
ok
Test Summary Report
-------------------
{T}/chmod/00.t (Wstat: 0 Tests: 5 Failed: 2)
"""  # noqa: W291 - prove pads its lines with spaces; the parser must cope


def test_parse_prove_verbose():
    r = parse_prove_verbose(VERBOSE, T)
    assert sorted(r) == ["chmod/00.t", "mkdir/00.t", "open/02.t", "rmdir/00.t"]
    chmod = r["chmod/00.t"]
    assert chmod.planned == 5 and chmod.passed == {1, 3, 4}       # TODO results count as passed
    assert set(chmod.failed) == {2, 5} and "got EPERM" in chmod.failed[2]
    assert set(r["open/02.t"].failures()) == {3, 4}                # planned 4, stopped after 2
    assert set(r["rmdir/00.t"].failures()) == {0}                  # no TAP at all
    assert r["mkdir/00.t"].failures() == {} and r["mkdir/00.t"].total == 2


def test_ranges_round_trip():
    assert ranges([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9-10"
    assert parse_ranges("1-3, 7, 9-10") == {1, 2, 3, 7, 9, 10}
    assert parse_ranges("") == set() and ranges([]) == ""


def test_compare_sorts_failures_and_finds_fixed_entries():
    r = parse_prove_verbose(VERBOSE, T)
    listed = [expected.Deviation("chmod/00.t", expected.DEVICES, "x", "2, 6"),
              expected.Deviation("open/02.t", expected.SETID, "y", "3-4"),
              expected.Deviation("link/00.t", expected.SETID, "z", "1")]
    cmp = compare(r, listed)
    assert cmp.unexpected == {"chmod/00.t": {5: ""}, "rmdir/00.t": {
        0: "no TAP at all (the test script did not run)"}}
    assert cmp.expected == {"devices": {"chmod/00.t": {2}}, "setid": {"open/02.t": {3, 4}}}
    assert cmp.now_passing == {"chmod/00.t": {6}} and cmp.not_run == ["link/00.t"]
    report = cmp.report(1.0, expected.CAUSES)
    assert report.index("UNEXPECTED") < report.index("PASSING now") < report.index("expected dev")
    assert "chmod/00.t: 5" in report and "devices (policy)" in report


def test_shorten_makes_generated_names_readable():
    assert shorten("tried 'stat pjdfstest_0123456789abcdef0123456789abcdef mode'") == \
        "tried 'stat N mode'"
    assert shorten("x" * 300, 10) == "x" * 10 + "..."
    assert shorten("a" * 100).startswith("<100-char name>")


def test_the_expected_list_is_well_formed():
    seen: dict[str, set[int]] = {}
    for d in expected.EXPECTED:
        assert d.cause in expected.CAUSES.values()
        assert d.cause.kind in (expected.POLICY, expected.BUG) and d.what
        nums = parse_ranges(d.subtests)
        assert nums and min(nums) >= 1
        assert not seen.get(d.file, set()) & nums, f"{d.file}: subtests listed twice"
        seen.setdefault(d.file, set()).update(nums)
        if DEFAULT_SOURCE.is_dir():
            assert (DEFAULT_SOURCE / "tests" / d.file).is_file(), d.file
    for cause in expected.CAUSES.values():
        assert cause.summary and cause.root_cause and cause.fix


def test_source_hash_covers_contents(tmp_path: Path):
    (tmp_path / "a").write_text("x")
    h1 = source_hash(tmp_path)
    (tmp_path / "a").write_text("y")
    assert source_hash(tmp_path) != h1
