"""The host end of the guest console: show it, log it, and watch it for agent lines.

The UART hands over one byte per guest port write. Bytes are gathered into lines so that the
terminal, the optional log file and the agent-line parser each see whole lines; the first agent line
and the exit status are timestamped here because that is where they become visible to the host.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from guest.console import ConsoleParser

logger = logging.getLogger(__name__)

MAX_LINE = 4096   # a guest that never prints a newline must not grow host memory without bound


class ConsoleSink:
    def __init__(self, output: BinaryIO | None, log_file: BinaryIO | None = None,
                 on_line: Callable[[bytes], None] | None = None, show_agent_lines: bool = True):
        self.output = output
        self.log_file = log_file
        self.parser = ConsoleParser()
        self.on_line = on_line
        self.show_agent_lines = show_agent_lines
        self._buf = bytearray()
        self._lock = threading.Lock()
        self.start = time.monotonic()
        self.first_agent_line_at: float | None = None
        self.exit_line_at: float | None = None
        #: Host time (seconds since `start`) at which each agent step line ended, by step number:
        #: the host's clock, for durations the guest's own clock may misread (see test_boot).
        self.step_host_s: dict[int, float] = {}
        self.bytes_seen = 0

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self.bytes_seen += len(data)
            self._buf += data
            while True:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    if len(self._buf) >= MAX_LINE:
                        line, self._buf = bytes(self._buf), bytearray()
                        self._line(line)
                    return
                line = bytes(self._buf[:nl + 1])
                del self._buf[:nl + 1]
                self._line(line)

    def _line(self, line: bytes) -> None:
        now = time.monotonic()
        is_agent = b"@@pyvmm" in line
        if is_agent and self.first_agent_line_at is None:
            self.first_agent_line_at = now
        if self.log_file is not None:
            self.log_file.write(line)
            self.log_file.flush()
        parsed = self.parser.feed(line)
        for p in parsed:
            if p.kind == "step" and p.step is not None:
                self.step_host_s[p.step] = now - self.start
        if self.output is not None:
            if parsed and parsed[0].kind == "echo":
                # `echo TEXT` is for the user: show the text itself, as a shell's echo would.
                self.output.write((parsed[0].text or "").encode() + b"\n")
            elif self.show_agent_lines or not is_agent:
                self.output.write(line)
            self.output.flush()
        if self.exit_line_at is None and self.parser.exit_status is not None:
            self.exit_line_at = now
        if self.on_line is not None:
            self.on_line(line)

    def flush(self) -> None:
        """At VM exit: pass on a final partial line (the parser marks it incomplete)."""
        with self._lock:
            if self._buf:
                tail, self._buf = bytes(self._buf), bytearray()
                if self.log_file is not None:
                    self.log_file.write(tail)
                if self.output is not None:
                    self.output.write(tail + b"\n")
                    self.output.flush()
                self.parser.feed(tail)
