"""Host-side pieces of the machine that need no guest: console sink, control socket, page walk."""

from __future__ import annotations

import io
import os
import struct
import threading

import pytest

from fuse.metrics import Metrics
from vmm.console import MAX_LINE, ConsoleSink
from vmm.control import ControlServer, request
from vmm.diagnostics import translate
from vmm.memory import GuestMemory
from vmm.vcpu import Stop, StopReason


def feed_bytes(sink: ConsoleSink, data: bytes) -> None:
    for b in data:                       # the UART hands over one byte per port write
        sink(bytes([b]))


def test_console_sink_lines_echo_and_timestamps():
    out = io.BytesIO()
    log = io.BytesIO()
    seen = []
    sink = ConsoleSink(out, log, on_line=seen.append)
    feed_bytes(sink, b"[    1.0] booting\n[    2.0] @@pyvmm echo hello there\n")
    assert sink.first_agent_line_at is not None and sink.exit_line_at is None
    feed_bytes(sink, b"[    2.1] @@pyvmm step=1 op=echo result=ok errno=0 ns=5\n"
                     b"[    2.2] @@pyvmm exit status=4\n")
    assert sink.parser.exit_status == 4 and sink.exit_line_at is not None
    lines = out.getvalue().decode().splitlines()
    assert "hello there" in lines                     # echo text shown as itself
    assert lines[0] == "[    1.0] booting"
    assert log.getvalue().count(b"\n") == 4           # the log keeps the raw lines
    assert len(seen) == 4


def test_console_sink_bounds_a_line_without_newline():
    out = io.BytesIO()
    sink = ConsoleSink(out)
    sink(b"x" * (MAX_LINE + 10))
    assert out.getvalue() == b"x" * (MAX_LINE + 10)   # passed on, not held forever
    sink(b"tail")
    sink.flush()                                      # at exit: the partial line ends the output
    assert out.getvalue().endswith(b"xtail\n")
    assert sink.parser.incomplete is None or "tail" in sink.parser.incomplete


class FakeMachine:
    """The control server's view of a Machine, over a real device Metrics object."""

    def __init__(self):
        self.metrics = Metrics()
        self.stops = []

    def device_metrics(self):
        return {"fs:t": self.metrics.snapshot()}

    def reset_metrics(self):
        self.metrics.reset()

    def request_stop(self, stop: Stop):
        self.stops.append(stop)


def test_control_socket_commands(tmp_path):
    path = str(tmp_path / "ctl.sock")
    m = FakeMachine()
    for _ in range(3):
        m.metrics.record_request("LOOKUP", 2)
        m.metrics.record_lookup(b"missing", None, 2)
    with ControlServer(path, m):
        stats = request(path, "stats")
        assert stats["ok"] is True and stats["devices"] == m.device_metrics()
        assert stats["devices"]["fs:t"]["lookups_by_name"] == {"missing": 3}
        assert request(path, "reset") == {"ok": True}
        after = request(path, "stats")["devices"]["fs:t"]
        assert after["ops"] == {} and after["lookups_by_name"] == {} and after["requests"] == 0
        bad = request(path, "explode")
        assert bad["ok"] is False and "unknown command" in bad["error"]
        assert request(path, "stop") == {"ok": True}
        assert m.stops[0].reason is StopReason.CONTROL
    assert not os.path.exists(path)


def test_control_socket_rejects_garbage_and_refuses_a_live_path(tmp_path):
    path = str(tmp_path / "ctl.sock")
    with ControlServer(path, FakeMachine()) as server:
        assert server.handle(b"{not json")["ok"] is False
        with pytest.raises(OSError, match="in use"):
            ControlServer(path, FakeMachine())
        assert server.handle(b'"stats"')["ok"] is True   # still serving after the refusal
    assert not [t for t in threading.enumerate() if t.name == "control"]  # thread joined


def test_translate_walks_4k_and_2m_pages():
    mem = GuestMemory.from_ranges([(0, 4 << 20)])
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    va_4k = 0xFFFF_8880_0020_3123
    va_2m = 0xFFFF_8880_0040_0456
    idx = lambda va, lvl: (va >> (12 + 9 * (lvl - 1))) & 0x1FF  # noqa: E731
    mem.write(pml4 + idx(va_4k, 4) * 8, struct.pack("<Q", pdpt | 3))
    mem.write(pdpt + idx(va_4k, 3) * 8, struct.pack("<Q", pd | 3))
    mem.write(pd + idx(va_4k, 2) * 8, struct.pack("<Q", pt | 3))
    mem.write(pt + idx(va_4k, 1) * 8, struct.pack("<Q", 0x5000 | 3))
    mem.write(pd + idx(va_2m, 2) * 8, struct.pack("<Q", 0x200000 | 0x83))
    assert translate(mem, pml4, va_4k) == 0x5123
    assert translate(mem, pml4, va_2m) == 0x200456
    assert translate(mem, pml4, 0xFFFF_8880_0060_0000) is None       # not present
    assert translate(mem, 0x7FFF_F000, va_4k) is None                # tables outside RAM
