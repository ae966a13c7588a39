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
