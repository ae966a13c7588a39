"""The share's cache options change what reaches the host, seen from the device's counters."""

from __future__ import annotations

from guest.script import pattern
from tests.e2e.helpers import assert_ok, fs_metrics, share, steps_by_op


def test_cache_never_vs_always_reads(boot, tmp_path):
    """cache=never opens with FOPEN_DIRECT_IO: every read goes to the host. cache=always keeps
    the page cache across opens: reading an unchanged file again costs no READ."""
    never, always = tmp_path / "never", tmp_path / "always"
    for d in (never, always):
        d.mkdir()
        (d / "f").write_bytes(pattern(65536, 4))
    r = boot("read /mnt/never/f\nread /mnt/never/f\nread /mnt/always/f\nread /mnt/always/f\n"
             "exit 0\n", shares=(share(never, "never", cache="never"),
                                 share(always, "always", cache="always", timeout=60)))
    assert_ok(r)
    crcs = {s.extra["crc32"] for s in steps_by_op(r, "read")}
    assert len(crcs) == 1                                   # same data whichever the path
    never_reads = fs_metrics(r, "never")["ops"]["READ"]
    always_reads = fs_metrics(r, "always")["ops"]["READ"]
    print(f"two reads of 64 KiB: cache=never {never_reads} READs, cache=always {always_reads}")
    assert never_reads >= 2 * always_reads and always_reads >= 1
    assert fs_metrics(r, "never")["bytes_read"] == 2 * 65536
    assert fs_metrics(r, "always")["bytes_read"] == 65536


def test_writeback_round_trip(boot, tmp_path):
    """writeback: true negotiates FUSE_WRITEBACK_CACHE, and writes then reach the host as the
    guest's page cache writes back (whole dirty pages, at close), not one WRITE per write call
    as on the write-through share beside it; the data is the same on both."""
    wb, wt = tmp_path / "wb", tmp_path / "wt"
    wb.mkdir()
    wt.mkdir()
    script = "".join(f"write /mnt/{t}/w 300000 8\nappend /mnt/{t}/w 1000 9\nfsync /mnt/{t}/w\n"
                     f"read /mnt/{t}/w\n" for t in ("wb", "wt")) + "exit 0\n"
    r = boot(script, shares=(share(wb, "wb", writeback=True), share(wt, "wt")))
    assert_ok(r)
    for d in (wb, wt):
        assert (d / "w").read_bytes() == pattern(300000, 8) + pattern(1000, 9)
    wb_fs, wt_fs = fs_metrics(r, "wb"), fs_metrics(r, "wt")
    assert "WRITEBACK_CACHE" in wb_fs["session"]["flags"]
    assert "WRITEBACK_CACHE" not in wt_fs["session"]["flags"]
    # write-through: 300000 bytes in 128 KiB write calls are 3 WRITEs, the append a 4th;
    # writeback: the dirty pages go out in as few WRITEs as max_pages allows.
    assert wt_fs["ops"]["WRITE"] >= 4
    assert wb_fs["ops"]["WRITE"] < wt_fs["ops"]["WRITE"]
    assert wb_fs["bytes_written"] >= 301000 and wt_fs["bytes_written"] == 301000
