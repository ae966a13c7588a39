"""Fixtures shared by several unit-test modules.

They live here rather than being imported from the module that uses them first: an imported
fixture is shadowed by every test parameter of the same name, which linters rightly report as a
redefinition of an unused import.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_fuse_memfs import MemFS, do_init

from fuse.server import Server
from tests.test_passthrough_wire import Wire


@pytest.fixture
def memfs(tmp_path: Path) -> Iterator[MemFS]:
    """The in-memory filesystem of tests/test_fuse_memfs.py, files under tmp_path."""
    fs = MemFS(tmp_path)
    yield fs
    fs.close()


@pytest.fixture
def server(memfs: MemFS) -> Server:
    """A FUSE server over `memfs`, past INIT as Linux 6.1 negotiates it."""
    s = Server(memfs)
    do_init(s)
    return s


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """An empty shared directory (tests that fingerprint siblings use tmp_path around it)."""
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def wire():
    """Wire(share, **options), each destroyed at the end: a passthrough's fds are plain ints
    that only destroy() closes (a test holding 1,000 handles must not leave them behind)."""
    made: list[Wire] = []

    def make(share, **kw) -> Wire:
        w = Wire(share, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.fs.destroy()


#: Tests that take a minute or more here (`pytest --durations`), longest first, started first so
#: that a parallel run (`-n auto --dist worksteal`, see the README's test command) does not end
#: with one worker alone on a long test while the others are idle. Names, not markers: the order
#: is a scheduling concern of this suite, not a property of the tests.
SLOW_FIRST = (
    "test_large_file_64mib",
    "test_pjdfstest_has_only_the_listed_deviations",
    "test_two_and_eight_vcpus_come_online",
    "test_negative_timeout_probe_counted_by_the_backend",
    "test_a_16mib_write_asks_no_getxattr_per_write",
    "test_probe_pattern_ten_times_fewer_lookups",
)


def xdist_initial_shares(count: int, workers: int) -> list[int]:
    """How many leading items of the collection `--dist worksteal` first hands each worker: it
    splits the collection into contiguous blocks, evenly, in worker order (xdist's
    WorkStealingScheduling.check_schedule). Later stealing takes from the ends of the queues."""
    shares = []
    for i in range(workers):
        shares.append(count // (workers - i))
        count -= shares[-1]
    return shares


def slow_first_order(items: list, workers: int, name=lambda item: item) -> list:
    """`items` reordered so that each worker's initial block starts with its share of the slow
    tests, dealt round-robin longest first; everything else keeps collection order.

    A plain "slow tests first" sort put every slow test in the first worker's block, so under
    worksteal the 64 MiB round trip started ten minutes into a clean-clone run, behind the other
    slow tests, and decided the run's length."""
    rank = {n: i for i, n in enumerate(SLOW_FIRST)}
    slow = sorted((it for it in items if name(it) in rank), key=lambda it: rank[name(it)])
    rest = [it for it in items if name(it) not in rank]
    blocks: list[list] = [[] for _ in range(max(1, workers))]
    for i, it in enumerate(slow):
        blocks[i % len(blocks)].append(it)
    rest_iter = iter(rest)
    for block, share in zip(blocks, xdist_initial_shares(len(items), len(blocks))):
        while len(block) < share:
            block.append(next(rest_iter))
    ordered = [it for block in blocks for it in block] + list(rest_iter)
    assert len(ordered) == len(items)
    return ordered


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests at the head of each xdist worker's first block (see `slow_first_order`)."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    items[:] = slow_first_order(items, workers, lambda item: getattr(item, "originalname", item.name))
