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


#: Tests that take a minute or more here (`pytest --durations`), started first so that a parallel
#: run (`-n auto`, see the README's test command) does not end with one worker alone on a long
#: test while the other is idle. Names, not markers: the order is a scheduling concern of this
#: suite, not a property of the tests.
SLOW_FIRST = (
    "test_pjdfstest_has_only_the_listed_deviations",
    "test_two_and_eight_vcpus_come_online",
    "test_large_file_64mib",
    "test_negative_timeout_probe_counted_by_the_backend",
    "test_a_16mib_write_asks_no_getxattr_per_write",
    "test_probe_pattern_ten_times_fewer_lookups",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, everything else in collection order (the sort is stable)."""
    items.sort(key=lambda item: getattr(item, "originalname", item.name) not in SLOW_FIRST)
