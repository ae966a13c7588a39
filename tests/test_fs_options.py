"""FsOptions validation: every bad field is rejected with a message naming it."""

import dataclasses
import math
import os

import pytest

from devices.virtio.fs.options import FS_MAX_TAG_LEN, FsOptions


def test_defaults(tmp_path):
    o = FsOptions(source=str(tmp_path), tag="share")
    assert o.source == str(tmp_path)
    assert o.num_request_queues == 1
    assert o.cache == "auto"
    assert o.timeout == 1.0
    assert o.negative_timeout == 0.0
    assert o.writeback is False and o.trace is False and o.trace_path is None
    assert o.positive_timeout == 1.0
    assert (o.max_inodes, o.max_handles, o.readdir_buffer, o.max_write) == (
        16384, 1024, 4096, 1 << 20)


@pytest.mark.parametrize("field, bad", [
    ("max_inodes", 15), ("max_inodes", 1 << 25), ("max_inodes", True), ("max_inodes", 1.5),
    ("max_handles", 0), ("max_handles", "10"), ("readdir_buffer", 1023),
    ("readdir_buffer", (1 << 20) + 1), ("max_write", 4095), ("max_write", (1 << 20) + 4096),
    ("max_write", 6000),
])
def test_bad_limits(tmp_path, field, bad):
    with pytest.raises(ValueError, match=field):
        FsOptions(source=str(tmp_path), tag="t", **{field: bad})


def test_frozen(tmp_path):
    o = FsOptions(source=str(tmp_path), tag="share")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.tag = "other"  # type: ignore[misc]


def test_relative_source_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    o = FsOptions(source="sub", tag="t")
    assert o.source == str(tmp_path / "sub")
    assert os.path.isabs(o.source)


@pytest.mark.parametrize("bad", ["", "/nonexistent/pyvmm/dir", "a\0b", 5])
def test_bad_source(bad):
    with pytest.raises(ValueError, match="source"):
        FsOptions(source=bad, tag="t")


def test_source_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match="source"):
        FsOptions(source=str(f), tag="t")


def test_tag_lengths(tmp_path):
    FsOptions(source=str(tmp_path), tag="x" * FS_MAX_TAG_LEN)
    FsOptions(source=str(tmp_path), tag="é" * (FS_MAX_TAG_LEN // 2))   # 36 bytes
    for bad in ["", "x" * (FS_MAX_TAG_LEN + 1), "é" * (FS_MAX_TAG_LEN // 2 + 1), "a\0b",
                "\udcff", None, b"tag"]:
        with pytest.raises(ValueError, match="tag"):
            FsOptions(source=str(tmp_path), tag=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_num_request_queues(tmp_path, bad):
    with pytest.raises(ValueError, match="num_request_queues"):
        FsOptions(source=str(tmp_path), tag="t", num_request_queues=bad)


def test_cache_policies(tmp_path):
    for c in ("never", "auto", "always"):
        assert FsOptions(source=str(tmp_path), tag="t", cache=c).cache == c
    for bad in ("", "none", "Always", None, 1):
        with pytest.raises(ValueError, match="cache"):
            FsOptions(source=str(tmp_path), tag="t", cache=bad)


@pytest.mark.parametrize("field", ["timeout", "negative_timeout"])
@pytest.mark.parametrize("bad", [-1, -0.001, math.inf, -math.inf, math.nan, "1", None, True])
def test_bad_timeouts(tmp_path, field, bad):
    with pytest.raises(ValueError, match=field):
        FsOptions(source=str(tmp_path), tag="t", **{field: bad})


def test_good_timeouts_become_float(tmp_path):
    o = FsOptions(source=str(tmp_path), tag="t", timeout=3600, negative_timeout=0)
    assert o.timeout == 3600.0 and isinstance(o.timeout, float)
    assert o.negative_timeout == 0.0 and isinstance(o.negative_timeout, float)
    o = FsOptions(source=str(tmp_path), tag="t", timeout=0, negative_timeout=2.5)
    assert o.negative_timeout == 2.5


def test_cache_never_zeroes_positive_timeout_only(tmp_path):
    o = FsOptions(source=str(tmp_path), tag="t", cache="never", timeout=10, negative_timeout=5)
    assert o.positive_timeout == 0.0
    assert o.negative_timeout == 5.0


@pytest.mark.parametrize("field", ["writeback", "trace"])
def test_bad_bools(tmp_path, field):
    with pytest.raises(ValueError, match=field):
        FsOptions(source=str(tmp_path), tag="t", **{field: 1})


def test_trace_path(tmp_path):
    assert FsOptions(source=str(tmp_path), tag="t", trace=True,
                     trace_path=str(tmp_path / "trace.jsonl")).trace_path
    for bad in ("", 3):
        with pytest.raises(ValueError, match="trace_path"):
            FsOptions(source=str(tmp_path), tag="t", trace_path=bad)
