"""guest/console.py: agent lines parsed exactly; partial lines and kernel faults detected."""

from __future__ import annotations

import pytest

from guest.console import ConsoleParser, parse_line, unescape

STEP = "@@pyvmm step=4 op=read result=ok errno=0 ns=20322210 size=6 crc32=0x363a3020"


def test_step_line_fields():
    line = parse_line("[    6.141450] " + STEP + "\r\n")
    assert line is not None and line.kind == "step"
    assert (line.step, line.op, line.result, line.errno, line.ns) == (4, "read", "ok", 0, 20322210)
    assert line.ok and line.errno_name == "OK"
    assert line.extra == {"size": "6", "crc32": "0x363a3020"}
    assert line.get_int("crc32") == 0x363a3020
    assert line.raw == STEP


def test_failed_step_with_errno():
    line = parse_line("@@pyvmm step=2 op=stat result=fail errno=2 ns=5 count=3 ok=0 ns_per_op=1")
    assert line.kind == "step" and not line.ok
    assert line.errno == 2 and line.errno_name == "ENOENT"
    assert line.get_int("count") == 3


def test_exit_error_echo_start():
    assert parse_line("@@pyvmm exit status=3").status == 3
    err = parse_line('@@pyvmm error line=7 msg="unknown op: frob"')
    assert (err.kind, err.line, err.msg) == ("error", 7, "unknown op: frob")
    echo = parse_line("[ 1.0] @@pyvmm echo hello  world")
    assert (echo.kind, echo.text) == ("echo", "hello  world")
    assert parse_line("@@pyvmm echo").text == ""
    start = parse_line("@@pyvmm start steps=3 uptime_ns=123")
    assert start.kind == "start" and start.get_int("steps") == 3


@pytest.mark.parametrize("text", [
    "",
    "[    0.000000] Linux version 6.1.192",
    "@@pyvmm",
    "@@pyvmm step=1 op=read result=ok errno=0",             # truncated before ns=
    "@@pyvmm step=1 op=read result=maybe errno=0 ns=1",
    "@@pyvmm step=x op=read result=ok errno=0 ns=1",
    "@@pyvmm step=1 op=read result=ok errno=0 ns=1 junk",  # extra without '='
    "@@pyvmm exit status=",
    "@@pyvmm error line=1 msg=\"unterminated",
    "@@pyvmm frobnicate",
    "@@pyvmm echoes",
])
def test_not_agent_lines(text):
    assert parse_line(text) is None


def test_unescape():
    assert unescape(r"a\x20b\x5cc") == "a b\\c"
    assert unescape("plain") == "plain"
    assert unescape(r"\xc3\xa9") == "é"
    line = parse_line(r"@@pyvmm step=1 op=readlink result=ok errno=0 ns=1 target=a\x20b")
    assert line.extra["target"] == "a b"


def test_parser_incremental_any_chunking():
    stream = ("[    1.0] boot noise\r\n[    5.7] @@pyvmm start steps=2 uptime_ns=5\r\n"
              "@@pyvmm echo hi\r\n@@pyvmm step=1 op=echo result=ok errno=0 ns=4\r\n"
              + STEP.replace("step=4", "step=2") + "\r\n@@pyvmm exit status=0\r\n"
              "[    7.6] reboot: Restarting system\r\n").encode()
    for chunk in (1, 2, 7, len(stream)):
        p = ConsoleParser()
        for i in range(0, len(stream), chunk):
            p.feed(stream[i:i + chunk])
        assert [s.step for s in p.steps] == [1, 2]
        assert p.echoes == ["hi"]
        assert p.exit_status == 0 and p.finished
        assert p.start is not None and p.panic is None and p.incomplete is None
        assert p.by_op("read")[0].get_int("size") == 6
        assert p.step(2).op == "read" and p.step(9) is None


def test_half_printed_line_is_not_parsed():
    p = ConsoleParser()
    found = p.feed(b"@@pyvmm step=1 op=read result=ok errno=0 ns=1 size=6 crc32=0x36")
    assert found == [] and p.steps == []
    assert p.incomplete == "@@pyvmm step=1 op=read result=ok errno=0 ns=1 size=6 crc32=0x36"
    p.feed(b"3a3020\n")
    assert p.steps[0].get_int("crc32") == 0x363a3020 and p.incomplete is None


def test_exit_line_cut_short_gives_no_status():
    p = ConsoleParser()
    p.feed(b"@@pyvmm exit sta")
    assert p.exit_status is None and not p.finished


@pytest.mark.parametrize("fault", [
    "[   12.3] Kernel panic - not syncing: Attempted to kill init!",
    "[    3.1] BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "[    3.2] Oops: 0002 [#1] SMP",
])
def test_faults_flagged(fault):
    p = ConsoleParser()
    p.feed(b"ok line\n" + fault.encode() + b"\n[ 4.0] more\n")
    assert p.panic == fault.split("] ", 1)[1]
    assert p.faults == [p.panic]


def test_agent_echo_of_panic_text_is_not_a_fault():
    p = ConsoleParser()
    p.feed(b"@@pyvmm echo Kernel panic BUG: Oops\n")
    assert p.panic is None and p.echoes == ["Kernel panic BUG: Oops"]


def test_errors_and_failed_steps_collected():
    p = ConsoleParser()
    p.feed(b'@@pyvmm error line=3 msg="too few arguments for: mkdir"\n@@pyvmm exit status=2\n')
    assert [e.line for e in p.errors] == [3] and p.exit_status == 2
    q = ConsoleParser()
    q.feed(b"@@pyvmm step=1 op=mark result=ok errno=0 ns=1 name=a\n"
           b"@@pyvmm step=2 op=unlink result=fail errno=2 ns=1\n@@pyvmm exit status=1\n")
    assert [s.step for s in q.failed] == [2]
    assert q.mark("a").step == 1 and q.mark("b") is None


def test_runaway_line_is_bounded():
    p = ConsoleParser()
    p.feed(b"x" * (ConsoleParser.MAX_PENDING + 10))
    assert p.incomplete is None
    p.feed(b"@@pyvmm exit status=4\n")
    assert p.exit_status == 4
