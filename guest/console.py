"""Parse what the in-kernel agent prints on the guest console.

Agent lines (spec "Guest agent protocol") start with `@@pyvmm `; the kernel may put a printk
timestamp (`[    1.234567] `) and the 8250 console a `\\r` around them, and ordinary kernel
messages are interleaved. Kinds:

    @@pyvmm start steps=N uptime_ns=T              the agent parsed its script and starts
    @@pyvmm echo TEXT                              printed by `echo TEXT` before its step line
    @@pyvmm step=N op=OP result=ok|fail errno=E ns=D [key=value ...]
    @@pyvmm error line=N msg="..."                 the script was rejected (nothing ran)
    @@pyvmm exit status=N                          last line; the guest then resets

Values the agent could not print verbatim (spaces, controls, quotes, backslashes, non-ASCII) are
escaped as `\\xHH`; `unescape()` reverses that. A line is only parsed once its newline has arrived:
the console is a byte stream and the guest may die mid-line, and a truncated `crc32=0x12` must not
be taken for a complete value. `ConsoleParser.incomplete` exposes such a trailing fragment.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from .script import errno_name

__all__ = ["AgentLine", "parse_line", "unescape", "ConsoleParser", "PREFIX"]

logger = logging.getLogger(__name__)

PREFIX = "@@pyvmm "
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_STEP = re.compile(r"step=(\d+) op=(\S+) result=(ok|fail) errno=(\d+) ns=(\d+)((?: \S+)*)")
_EXIT = re.compile(r"exit status=(-?\d+)")
_ERROR = re.compile(r'error line=(\d+) msg="(.*)"')
_START = re.compile(r"start((?: \S+)*)")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
# Kernel messages that mean the guest is broken, whatever the agent says.
_FAULTS = ("Kernel panic", "BUG:", "Oops")


def unescape(value: str) -> str:
    """Undo the agent's \\xHH escaping (the bytes are decoded as UTF-8, invalid ones kept)."""
    if "\\x" not in value:
        return value
    raw = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(value):
        raw += value[pos:m.start()].encode("utf-8", "surrogateescape")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += value[pos:].encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "surrogateescape")


def _pairs(text: str) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for tok in text.split():
        key, sep, value = tok.partition("=")
        if not sep or not key:
            return None
        out[key] = unescape(value)
    return out


@dataclass(frozen=True)
class AgentLine:
    """One parsed agent line. Fields that a kind does not have are None."""

    kind: str                      # "step" | "exit" | "error" | "echo" | "start"
    raw: str
    step: int | None = None
    op: str | None = None
    result: str | None = None      # "ok" | "fail"
    errno: int | None = None       # 0 = success; for stat xN / probe: the last repetition's errno
    ns: int | None = None          # step duration in guest ns
    status: int | None = None      # exit
    line: int | None = None        # error: script line number (0: not about a line)
    msg: str | None = None         # error
    text: str | None = None        # echo
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    @property
    def errno_name(self) -> str | None:
        return None if self.errno is None else errno_name(self.errno)

    def get_int(self, key: str) -> int:
        """An extra value as an int (accepts 0x hex, e.g. crc32); KeyError if absent."""
        return int(self.extra[key], 0)


def parse_line(line: str) -> AgentLine | None:
    """Parse one COMPLETE console line (its newline already seen, with or without it).

    Returns None for anything that is not a well-formed agent line, including ordinary kernel
    messages and agent lines with a missing mandatory field.
    """
    line = line.rstrip("\r\n")
    at = line.find(PREFIX)
    if at < 0:
        return None
    # Whatever precedes the prefix (a printk timestamp, a \r, the tail of another CPU's
    # unterminated message) is not ours; the agent's own fields are checked strictly below.
    raw = line[at:]
    body = raw[len(PREFIX):]
    if body.startswith("echo"):
        if body == "echo":
            return AgentLine("echo", raw, text="")
        if body.startswith("echo "):
            return AgentLine("echo", raw, text=body[5:])
        return None
    m = _STEP.fullmatch(body)
    if m:
        extra = _pairs(m.group(6))
        if extra is None:
            return None
        return AgentLine("step", raw, step=int(m.group(1)), op=m.group(2), result=m.group(3),
                         errno=int(m.group(4)), ns=int(m.group(5)), extra=extra)
    m = _EXIT.fullmatch(body)
    if m:
        return AgentLine("exit", raw, status=int(m.group(1)))
    m = _ERROR.fullmatch(body)
    if m:
        return AgentLine("error", raw, line=int(m.group(1)), msg=m.group(2))
    m = _START.fullmatch(body)
    if m:
        extra = _pairs(m.group(1))
        if extra is not None:
            return AgentLine("start", raw, extra=extra)
    return None


class ConsoleParser:
    """Incremental: feed() console bytes in any chunking; complete lines are parsed as they end."""

    MAX_PENDING = 64 * 1024   # a guest that never sends a newline must not grow memory unbounded

    def __init__(self) -> None:
        self._pending = bytearray()
        self.lines: list[AgentLine] = []       # every agent line, in order
        self.steps: list[AgentLine] = []
        self.errors: list[AgentLine] = []
        self.echoes: list[str] = []
        self.start: AgentLine | None = None
        self.exit_status: int | None = None
        self.panic: str | None = None          # first Kernel panic / BUG: / Oops line
        self.faults: list[str] = []            # all such lines

    def feed(self, data: bytes) -> list[AgentLine]:
        """Add console bytes; returns the agent lines completed by them."""
        self._pending += data
        found: list[AgentLine] = []
        while True:
            nl = self._pending.find(b"\n")
            if nl < 0:
                break
            text = self._pending[:nl].decode("utf-8", "replace")
            del self._pending[:nl + 1]
            parsed = self._line(text)
            if parsed is not None:
                found.append(parsed)
        if len(self._pending) > self.MAX_PENDING:
            logger.warning("console: dropping %d bytes without a newline", len(self._pending))
            self._pending.clear()
        return found

    @property
    def incomplete(self) -> str | None:
        """The trailing fragment that has no newline yet (e.g. the guest died mid-line)."""
        if not self._pending:
            return None
        return self._pending.decode("utf-8", "replace")

    @property
    def finished(self) -> bool:
        """The agent printed its exit line."""
        return self.exit_status is not None

    def step(self, n: int) -> AgentLine | None:
        for s in self.steps:
            if s.step == n:
                return s
        return None

    def by_op(self, op: str) -> list[AgentLine]:
        return [s for s in self.steps if s.op == op]

    def mark(self, name: str) -> AgentLine | None:
        """The step line of `mark NAME`."""
        for s in self.steps:
            if s.op == "mark" and s.extra.get("name") == name:
                return s
        return None

    @property
    def failed(self) -> list[AgentLine]:
        return [s for s in self.steps if not s.ok]

    def _line(self, text: str) -> AgentLine | None:
        parsed = parse_line(text)
        if parsed is None:
            if PREFIX not in text:   # an agent echo of "Oops" is not a fault
                for marker in _FAULTS:
                    if marker in text:
                        clean = _TIMESTAMP.sub("", text.strip("\r"))
                        self.faults.append(clean)
                        if self.panic is None:
                            self.panic = clean
                        break
            return None
        self.lines.append(parsed)
        if parsed.kind == "step":
            self.steps.append(parsed)
        elif parsed.kind == "exit":
            self.exit_status = parsed.status
        elif parsed.kind == "error":
            self.errors.append(parsed)
        elif parsed.kind == "echo":
            self.echoes.append(parsed.text or "")
        elif parsed.kind == "start":
            self.start = parsed
        return parsed
