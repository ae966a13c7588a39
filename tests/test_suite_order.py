"""The suite's own scheduling: under `-n 2 --dist worksteal` (the README's test command) each
worker starts with its share of the slow tests, longest first (tests/conftest.py).

Run through real pytest-xdist workers in a scratch directory, so a change in xdist's initial
split (which `xdist_initial_shares` mirrors) fails here instead of quietly serialising the slow
tests behind each other again."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import SLOW_FIRST, slow_first_order, xdist_initial_shares

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent


def test_initial_shares_cover_the_collection_evenly():
    assert xdist_initial_shares(10, 2) == [5, 5]
    assert xdist_initial_shares(11, 2) == [5, 6]
    assert xdist_initial_shares(7, 3) == [2, 2, 3]
    assert sum(xdist_initial_shares(1366, 4)) == 1366


def test_slow_tests_are_dealt_round_robin_longest_first():
    items = [f"fast{i}" for i in range(10)] + list(reversed(SLOW_FIRST[:4]))
    ordered = slow_first_order(items, 2)
    assert sorted(ordered) == sorted(items)
    first, second = ordered[:7], ordered[7:]
    assert first[:2] == [SLOW_FIRST[0], SLOW_FIRST[2]]
    assert second[:2] == [SLOW_FIRST[1], SLOW_FIRST[3]]
    assert [i for i in ordered if i.startswith("fast")] == [f"fast{i}" for i in range(10)]
    assert slow_first_order(items, 1)[:4] == list(SLOW_FIRST[:4])


def test_each_xdist_worker_starts_with_a_slow_test(pytester, monkeypatch):
    log = pytester.path / "order.log"
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    names = [f"test_fast_{i}" for i in range(12)] + list(SLOW_FIRST[:2])
    pytester.makepyfile(test_many="import os\n" + "".join(
        f"def {n}():\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        f"        f.write(os.environ['PYTEST_XDIST_WORKER'] + ' {n}\\n')\n\n" for n in names))
    # The scratch conftest imports ours, which imports its neighbours as top-level modules.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO), str(REPO / "tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "worksteal", "-p", "no:randomly",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(names))
    first: dict[str, str] = {}
    for line in log.read_text().splitlines():
        worker, name = line.split()
        first.setdefault(worker, name)
    assert sorted(first.values()) == sorted(SLOW_FIRST[:2]), first
