"""negative_timeout end to end: count the LOOKUPs that reach the host while a guest probes names.

Each test boots a guest whose agent runs the scenario inside the guest kernel; the host reads the
virtio-fs device's own counters (per-name LOOKUP counts, outcomes) and, where it matters, the JSON
trace. Several shares with different options in one guest let one boot compare configurations.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from tests.e2e.helpers import assert_ok, fs_metrics, share, steps_by_op
from vmm.control import request


@pytest.fixture(params=["mmio", "vhost-user"])
def boot(request, guest):
    """Every scenario twice: the device in the VMM, and the same device as a back-end process
    (`python -m vmm device fs`) behind our vhost-user front-end; the counters asserted on are the
    serving device's own either way (for vhost-user, read from the back-end's control socket)."""
    return functools.partial(guest.run, transport=request.param)


def lookups(result, name: str, tag: str = "share") -> int:
    return fs_metrics(result, tag)["lookups_by_name"].get(name, 0)


def report(label: str, step) -> None:
    print(f"{label}: {step.extra['count']} stats, {int(step.extra['ns_per_op']) / 1000:.1f} us per stat")


def test_zero_timeout_every_stat_is_a_lookup(boot, tmp_path):
    r = boot("stat /mnt/share/missing x100 expect=ENOENT\nexit 0\n",
             shares=(share(tmp_path, negative_timeout=0),))
    assert_ok(r)
    st = steps_by_op(r, "stat")[0]
    assert (st.extra["count"], st.extra["ok"], st.errno) == ("100", "0", 2)
    assert lookups(r, "missing") == 100
    fs = fs_metrics(r)
    assert fs["lookup_negative"] == 0 and fs["lookup_enoent"] == 100
    report("negative_timeout=0", st)


def test_cached_negative_entry_costs_one_lookup(boot, tmp_path):
    r = boot("stat /mnt/share/missing x100 expect=ENOENT\nexit 0\n",
             shares=(share(tmp_path, negative_timeout=60),))
    assert_ok(r)
    st = steps_by_op(r, "stat")[0]
    assert (st.extra["count"], st.extra["ok"], st.errno) == ("100", "0", 2)   # still ENOENT, 100x
    assert lookups(r, "missing") == 1
    fs = fs_metrics(r)
    assert fs["lookup_negative"] == 1 and fs["lookup_enoent"] == 0
    report("negative_timeout=60", st)


def test_negative_entry_expires(boot, tmp_path):
    trace = tmp_path / "trace.jsonl"
    root = tmp_path / "share"
    root.mkdir()
    r = boot("stat /mnt/share/gone expect=ENOENT\nstat /mnt/share/gone expect=ENOENT\n"
             "sleep 2000\nstat /mnt/share/gone expect=ENOENT\nexit 0\n",
             shares=(share(root, negative_timeout=1, trace=True, trace_path=str(trace)),))
    assert_ok(r)
    assert lookups(r, "gone") == 2
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    gone = [rec for rec in records if rec["op"] == "LOOKUP" and rec["name"] == "gone"]
    assert len(gone) == 2 and all(rec["error"] == 0 and rec["nodeid"] == 1 for rec in gone)
    assert gone[1]["t"] - gone[0]["t"] >= 1.0     # the second one came after the expiry


def test_guest_created_file_is_visible_at_once(boot, tmp_path):
    r = boot("stat /mnt/share/new x10 expect=ENOENT\ncreate /mnt/share/new\n"
             "stat /mnt/share/new\nwrite /mnt/share/new 100 1\nstat /mnt/share/new\n"
             "create /mnt/share/tmp\nunlink /mnt/share/tmp\nstat /mnt/share/tmp x10 expect=ENOENT\n"
             "exit 0\n",
             shares=(share(tmp_path, negative_timeout=60, timeout=60),))
    assert_ok(r)
    assert steps_by_op(r, "stat")[1].extra["size"] == "0"
    assert steps_by_op(r, "stat")[2].extra["size"] == "100"
    # Ten stats cost one LOOKUP; the agent's create (O_CREAT|O_EXCL) forces one revalidating
    # LOOKUP in the guest kernel (LOOKUP_EXCL ignores the timeout); after the create the new file
    # is seen at once and costs no further LOOKUP.
    assert lookups(r, "new") == 2
    print("LOOKUPs of a name created, unlinked and probed 10 times:", lookups(r, "tmp"))
    # After the unlink the name is missing again and negatively cached again.
    assert lookups(r, "tmp") == 2     # the create's own LOOKUP, then one after the unlink


def test_host_created_file_stays_invisible_until_timeout(boot, tmp_path):
    """The documented trade-off: a host-side create behind a cached negative entry is not seen
    until negative_timeout passes (virtio-fs in Linux 6.1 has no invalidation channel)."""
    root = tmp_path / "share"
    root.mkdir()

    def on_line(line: bytes) -> None:
        # Runs on the vCPU thread that printed the line, so the guest waits until we are done.
        if b"op=mark" in line and b"name=host-creates" in line:
            (root / "late").write_bytes(b"from the host")

    r = boot("stat /mnt/share/late expect=ENOENT\nmark host-creates\n"
             "stat /mnt/share/late x20 expect=ENOENT\nsleep 3000\nstat /mnt/share/late\nexit 0\n",
             shares=(share(root, negative_timeout=2),), on_line=on_line)
    assert_ok(r)
    stats = steps_by_op(r, "stat")
    assert stats[1].extra["ok"] == "0"                  # cached: the host file is invisible
    assert stats[2].extra["size"] == str(len(b"from the host"))   # expired: now it appears
    assert lookups(r, "late") == 2


def test_without_negative_cache_host_create_is_seen_at_once(boot, tmp_path):
    root = tmp_path / "share"
    root.mkdir()

    def on_line(line: bytes) -> None:
        if b"op=mark" in line and b"name=host-creates" in line:
            (root / "late").write_bytes(b"x")

    r = boot("stat /mnt/share/late expect=ENOENT\nmark host-creates\nstat /mnt/share/late\nexit 0\n",
             shares=(share(root, negative_timeout=0),), on_line=on_line)
    assert_ok(r)
    assert lookups(r, "late") == 2


def test_positive_entries_follow_timeout(boot, tmp_path):
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    for d in (cold, warm):
        d.mkdir()
        (d / "file").write_bytes(b"data")
    r = boot("stat /mnt/cold/file x50\nstat /mnt/warm/file x50\nexit 0\n",
             shares=(share(cold, "cold", timeout=0), share(warm, "warm", timeout=60)))
    assert_ok(r)
    cold_fs, warm_fs = fs_metrics(r, "cold"), fs_metrics(r, "warm")
    print(f"timeout=0: {lookups(r, 'file', 'cold')} LOOKUPs, {cold_fs['ops'].get('GETATTR', 0)} "
          f"GETATTRs; timeout=60: {lookups(r, 'file', 'warm')} LOOKUPs, "
          f"{warm_fs['ops'].get('GETATTR', 0)} GETATTRs for 50 stats each")
    assert lookups(r, "file", "warm") == 1
    assert warm_fs["ops"].get("GETATTR", 0) <= 1
    assert lookups(r, "file", "cold") >= 50       # every stat revalidates the entry
    assert lookups(r, "file", "cold") + cold_fs["ops"].get("GETATTR", 0) >= 100


def test_probe_pattern_ten_times_fewer_lookups(boot, tmp_path):
    """A PATH-search-like workload: 50 missing names, each probed 20 times, round robin."""
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    plain.mkdir()
    cached.mkdir()
    r = boot("probe /mnt/plain 50 20 expect=ENOENT\nprobe /mnt/cached 50 20 expect=ENOENT\nexit 0\n",
             shares=(share(plain, "plain", negative_timeout=0),
                     share(cached, "cached", negative_timeout=60)))
    assert_ok(r)
    p_plain, p_cached = steps_by_op(r, "probe")
    assert p_plain.extra["count"] == p_cached.extra["count"] == "1000"
    assert p_plain.extra["ok"] == p_cached.extra["ok"] == "0"
    n_plain = fs_metrics(r, "plain")["ops"]["LOOKUP"]
    n_cached = fs_metrics(r, "cached")["ops"]["LOOKUP"]
    print(f"probe 50x20: {n_plain} LOOKUPs without negative caching, {n_cached} with; "
          f"{int(p_plain.extra['ns_per_op']) / 1000:.1f} vs {int(p_cached.extra['ns_per_op']) / 1000:.1f}"
          " us per stat")
    assert n_plain >= 1000 and n_cached == 50
    assert n_plain >= 10 * n_cached


def test_other_lookup_errors_are_never_cached(boot, tmp_path):
    """Only ENOENT becomes a negative entry. With max_inodes reached, a LOOKUP of a name the
    device does not know yet fails with ENFILE inside the passthrough's lookup (where the
    negative-entry decision is taken): every stat of it must reach the host. A 256-byte name is
    legal for the guest's FUSE client (its limit is 1024) but the protocol layer answers
    ENAMETOOLONG before the file system sees it: also never cached. A name under a regular file is
    answered by the guest's own path walk (ENOTDIR) and never reaches the host at all. The
    missing name beside them proves negative caching was on in the same run."""
    root = tmp_path / "share"
    root.mkdir()
    (root / "plain-file").write_bytes(b"x")
    known = [f"f{i:02}" for i in range(14)]            # + the root and plain-file: 16 node ids
    for name in known + ["one-too-many"]:
        (root / name).write_bytes(b"y")
    long = "n" * 256
    r = boot("".join(f"stat /mnt/share/{n}\n" for n in known) +
             f"stat /mnt/share/{long} x3 expect=ENAMETOOLONG\n"
             f"stat /mnt/share/plain-file/child x5 expect=ENOTDIR\n"
             f"stat /mnt/share/one-too-many x3 expect=ENFILE\n"
             f"stat /mnt/share/missing x4 expect=ENOENT\nexit 0\n",
             shares=(share(root, negative_timeout=60, max_inodes=16),))
    assert_ok(r)
    fs = fs_metrics(r)
    assert lookups(r, "one-too-many") == 3            # every ENFILE went to the host
    assert fs["errors"].get("ENFILE") == 3
    assert lookups(r, long) == 3                      # every ENAMETOOLONG went to the host
    assert fs["errors"].get("ENAMETOOLONG") == 3
    assert lookups(r, "child") == 0                   # the guest knew plain-file is no dir
    assert lookups(r, "missing") == 1                 # ...while ENOENT was cached
    assert fs["lookup_negative"] == 1


def test_control_socket_reset_zeroes_counters(guest, tmp_path):
    """The VMM's control socket reaches the devices in its process (mmio only: a vhost-user
    back-end has its own control socket)."""
    boot = guest.run
    root = tmp_path / "share"
    root.mkdir()
    sock = str(tmp_path / "ctl.sock")
    seen = {}

    def on_line(line: bytes) -> None:
        if b"op=mark" in line and b"name=reset" in line:
            seen["before"] = request(sock, "stats")["devices"]["fs:share"]["lookups_by_name"]
            assert request(sock, "reset") == {"ok": True}

    r = boot("stat /mnt/share/a x5 expect=ENOENT\nmark reset\nstat /mnt/share/b x3 expect=ENOENT\n"
             "exit 0\n", shares=(share(root),), control_path=sock, on_line=on_line)
    assert_ok(r)
    assert seen["before"]["a"] == 5
    after = fs_metrics(r)["lookups_by_name"]
    assert "a" not in after and after["b"] == 3
    assert not Path(sock).exists()
