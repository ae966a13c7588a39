"""fuse.encode: the wire form of timeouts, attributes and entries, checked field by field."""

from __future__ import annotations

import os
import stat

import pytest

from fuse import abi
from fuse.encode import attr_values, encode_dev, entry_out, split_timeout
from fuse.filesystem import Entry


def test_split_timeout() -> None:
    assert split_timeout(0) == (0, 0)
    assert split_timeout(-1.0) == (0, 0)
    assert split_timeout(float("nan")) == (0, 0)
    assert split_timeout(1.5) == (1, 500_000_000)
    assert split_timeout(0.001) == (0, 1_000_000)
    assert split_timeout(86400.0) == (86400, 0)
    assert split_timeout(float("inf")) == (2**64 - 1, 0)
    assert split_timeout(0.9999999999) == (1, 0)


def test_attr_values_of_a_real_stat(tmp_path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    os.utime(f, ns=(1_000_000_001, -1_500_000_000))  # mtime before 1970
    st = os.lstat(f)
    a = abi.ATTR.tuple_type._make(attr_values(st))
    assert (a.ino, a.size, a.blocks, a.nlink) == (st.st_ino, 5, st.st_blocks, 1)
    assert (a.atime, a.atimensec) == (1, 1)
    # -1.5 s is -2 s + 0.5 s: two's complement seconds, nanoseconds always positive
    assert (a.mtime, a.mtimensec) == (2**64 - 2, 500_000_000)
    assert stat.S_ISREG(a.mode) and a.blksize == st.st_blksize and a.flags == 0


def test_attr_values_without_ns_fields_uses_whole_seconds() -> None:
    st = os.stat_result((stat.S_IFDIR | 0o755, 7, 0, 2, 0, 0, 0, 10, 20, 30))
    a = abi.ATTR.tuple_type._make(attr_values(st))
    assert (a.atime, a.mtime, a.ctime) == (10, 20, 30)
    assert (a.atimensec, a.mtimensec, a.ctimensec) == (0, 0, 0)
    assert (a.blocks, a.blksize, a.rdev) == (0, 0, 0)


def test_encode_dev_is_new_encode_dev() -> None:
    assert encode_dev(os.makedev(8, 1)) == (8 << 8) | 1
    assert encode_dev(os.makedev(259, 70000)) == \
        (70000 & 0xFF) | (259 << 8) | ((70000 & ~0xFF) << 12) & 0xFFFFFFFF


def test_entry_out_positive_negative_and_bugs() -> None:
    st = os.stat_result((stat.S_IFREG | 0o644, 9, 0, 1, 0, 0, 3, 0, 0, 0))
    e = abi.ENTRY_OUT.unpack(entry_out(Entry(5, 2, st, 1.25, 0.5)))
    assert (e.nodeid, e.generation, e.attr.ino, e.attr.size) == (5, 2, 9, 3)
    assert (e.entry_valid, e.entry_valid_nsec, e.attr_valid, e.attr_valid_nsec) == \
        (1, 250_000_000, 0, 500_000_000)
    neg = abi.ENTRY_OUT.unpack(entry_out(Entry.negative(3.0), negative_ok=True))
    assert (neg.nodeid, neg.entry_valid) == (0, 3) and neg.attr == abi.ATTR.zero()
    with pytest.raises(TypeError):
        entry_out(Entry.negative(3.0))                 # a new node may not be "nothing"
    with pytest.raises(TypeError):
        entry_out(Entry(5, 0, None, 1.0, 1.0))         # positive without attributes
    with pytest.raises(TypeError):
        entry_out((5, 0, st, 1.0, 1.0))                # not an Entry
