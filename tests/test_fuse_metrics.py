"""Metrics counting/reset and the JSON-lines trace, standalone and as fed by the Server."""

from __future__ import annotations

import errno
import io
import json
import threading
from pathlib import Path

import pytest

from fuse import abi
from fuse.abi import Opcode
from fuse.metrics import Metrics
from fuse.server import Server
from fuse.trace import Trace
from test_fuse_memfs import MemFS, cstr, do_init, request, send


def test_counters_and_reset() -> None:
    m = Metrics(max_names=2)
    m.record_request("LOOKUP", 0)
    m.record_request("LOOKUP", errno.ENOENT)
    m.record_request("GETATTR", errno.EIO)
    m.record_dropped("FORGET")
    m.record_dropped()
    m.record_lookup(b"a", 5, 0)
    m.record_lookup(b"b", 0, 0)
    m.record_lookup(b"a", None, errno.ENOENT)
    m.record_lookup(b"c", None, errno.EACCES)  # third distinct name: over the cap
    m.add_bytes_read(10)
    m.add_bytes_written(7)
    snap = m.snapshot()
    json.dumps(snap)
    assert snap["requests"] == 5 and snap["dropped"] == 2
    assert snap["ops"] == {"LOOKUP": 2, "GETATTR": 1, "FORGET": 1}
    assert snap["errors"] == {"ENOENT": 1, "EIO": 1}
    assert (snap["lookup_positive"], snap["lookup_negative"]) == (1, 1)
    assert (snap["lookup_error"], snap["lookup_enoent"]) == (2, 1)
    assert snap["lookups_by_name"] == {"a": 2, "b": 1}
    assert snap["lookups_by_name_dropped"] == 1
    assert (snap["bytes_read"], snap["bytes_written"]) == (10, 7)
    m.reset()
    z = m.snapshot()
    assert z["requests"] == 0 and z["ops"] == {} and z["lookups_by_name"] == {}
    assert z["lookup_error"] == 0 and z["bytes_read"] == 0


def test_thread_safe_counting() -> None:
    m = Metrics()

    def work() -> None:
        for i in range(2000):
            m.record_request("READ", 0)
            m.record_lookup(b"n%d" % (i % 10), 1, 0)
            m.add_bytes_read(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap["ops"]["READ"] == 16000 and snap["bytes_read"] == 16000
    assert snap["lookup_positive"] == 16000 and sum(snap["lookups_by_name"].values()) == 16000


def test_server_feeds_metrics_and_trace(tmp_path: Path) -> None:
    fs = MemFS(tmp_path)
    fs.add_file(1, b"here")
    m = Metrics()
    trace_path = tmp_path / "trace.jsonl"
    trace = Trace.open(str(trace_path))
    s = Server(fs, metrics=m, trace=trace)
    do_init(s)
    send(s, request(Opcode.LOOKUP, cstr(b"here"), unique=11), queue=3)
    send(s, request(Opcode.LOOKUP, cstr(b"gone"), unique=12), queue=3)
    send(s, request(Opcode.LOOKUP, cstr(b"here"), unique=13), queue=3)
    send(s, request(Opcode.LOOKUP, b"bad/\0", unique=14), queue=3)
    send(s, request(999, unique=15))
    send(s, request(Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1), nodeid=2, unique=16))
    send(s, b"short")
    snap = m.snapshot()
    assert snap["requests"] == 8  # INIT + 6 + the dropped short one
    assert snap["ops"]["LOOKUP"] == 4 and snap["ops"]["UNKNOWN"] == 1
    assert snap["ops"]["INIT"] == 1 and snap["ops"]["FORGET"] == 1
    assert snap["errors"] == {"ENOENT": 1, "EINVAL": 1, "ENOSYS": 1}
    assert snap["lookup_positive"] == 2 and snap["lookup_enoent"] == 1
    assert snap["lookup_error"] == 2 and snap["lookup_negative"] == 0
    assert snap["lookups_by_name"] == {"here": 2, "gone": 1, "bad/": 1}
    assert snap["dropped"] == 1

    trace.close()
    lines = [json.loads(line) for line in trace_path.read_text().splitlines()]
    assert len(lines) == 7  # every request with a header
    for rec in lines:
        assert set(rec) == {"t", "queue", "op", "unique", "nodeid", "name", "error", "us"}
        assert rec["us"] >= 0 and rec["t"] > 1.6e9
    by_unique = {rec["unique"]: rec for rec in lines}
    assert by_unique[11] == {**by_unique[11], "op": "LOOKUP", "queue": 3, "nodeid": 1,
                             "name": "here", "error": 0}
    assert by_unique[12]["error"] == errno.ENOENT and by_unique[12]["name"] == "gone"
    assert by_unique[14]["error"] == errno.EINVAL
    assert by_unique[15]["op"] == "OP_999" and by_unique[15]["name"] is None
    assert by_unique[16]["op"] == "FORGET" and by_unique[16]["nodeid"] == 2
    fs.close()


class Log:
    """A RequestObserver that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def handled(self, *args) -> None:
        self.calls.append(("handled",) + args)

    def dropped(self, *args) -> None:
        self.calls.append(("dropped",) + args)


def test_one_injected_observer_sees_every_outcome(tmp_path: Path) -> None:
    fs = MemFS(tmp_path)
    nid = fs.add_file(1, b"f", b"0123456789")
    obs = Log()
    s = Server(fs, observer=obs)
    do_init(s)
    send(s, request(Opcode.LOOKUP, cstr(b"f"), unique=21), queue=2)
    send(s, request(Opcode.LOOKUP, cstr(b"nope"), unique=22), queue=2)
    fh = fs.open(None, nid, 0)[0]
    send(s, request(Opcode.READ, abi.READ_IN.pack(fh=fh, size=4), nodeid=nid, unique=23))
    send(s, request(Opcode.FORGET, abi.FORGET_IN.pack(nlookup=1), nodeid=nid, unique=24))
    send(s, request(Opcode.BATCH_FORGET, abi.BATCH_FORGET_IN.pack(count=9), unique=25))
    send(s, b"short")
    kinds = [c[0] for c in obs.calls]
    assert kinds == ["handled"] * 5 + ["dropped"] * 2
    _, queue, opcode, unique, nodeid, name, error, entry, ns = obs.calls[1]
    assert (queue, opcode, unique, nodeid, name, error) == (2, Opcode.LOOKUP, 21, 1, b"f", 0)
    assert entry.nodeid == nid and ns > 0           # the filesystem's Entry, and a duration
    assert obs.calls[2][5:8] == (b"nope", errno.ENOENT, None)
    assert obs.calls[3][2] == Opcode.READ and obs.calls[3][7] == 4   # bytes read
    assert obs.calls[4][2] == Opcode.FORGET and obs.calls[4][6] == 0
    assert obs.calls[5][1:4] == (1, Opcode.BATCH_FORGET, 25)
    assert obs.calls[6][1:3] == (1, None)             # not even a header
    with pytest.raises(ValueError):
        Server(fs, observer=obs, metrics=Metrics())
    fs.close()


def test_trace_survives_a_closed_stream() -> None:
    buf = io.StringIO()
    t = Trace(buf)
    t.record(queue=0, op="LOOKUP", unique=1, nodeid=1, name=b"\xff\xfe", error=0, us=1.0)
    assert json.loads(buf.getvalue())["name"] == "\\xff\\xfe"
    buf.close()
    t.record(queue=0, op="LOOKUP", unique=2, nodeid=1, name=None, error=0, us=1.0)  # no raise


def test_a_failing_observer_does_not_fail_the_request(tmp_path: Path, caplog) -> None:
    class Broken:
        def handled(self, *args) -> None:
            raise RuntimeError("observer bug")

        def dropped(self, *args) -> None:
            raise RuntimeError("observer bug")

    fs = MemFS(tmp_path)
    s = Server(fs, observer=Broken())
    out = do_init(s)  # answered, whatever the observer does
    assert out.major == 7
    assert send(s, b"short") is None
    assert "observer bug" in caplog.text
    fs.close()


def test_metrics_report_what_the_session_negotiated(tmp_path: Path) -> None:
    m = Metrics()
    assert m.snapshot()["session"] is None
    s = Server(MemFS(tmp_path), metrics=m)
    out = do_init(s)
    session = m.snapshot()["session"]
    assert session["minor"] == out.minor and session["max_write"] == out.max_write
    assert session["flags"] == abi.init_flag_names(out.flags | out.flags2 << 32)
    assert "MAX_PAGES" in session["flags"] and "WRITEBACK_CACHE" not in session["flags"]
    m.reset()                                   # counters go, the session's facts stay
    assert m.snapshot()["session"] == session and m.snapshot()["requests"] == 0
