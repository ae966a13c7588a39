"""Run one guest from Python: an agent script and shares in, a finished run out.

The CLI builds its Config from YAML and flags; the pytest plugin, the benchmarks and ``sweep``
build it from arguments. This module is that second path, in one place.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from pathlib import Path

from devices.virtio.fs.options import FsOptions

from .config import (Config, GuestConfig, KernelConfig, SerialConfig, VmConfig,
                     exec_to_script)
from .machine import Machine, RunResult


def guest_config(script: str, shares: Iterable[FsOptions] = (), *,
                 kernel: str | Path = "auto", vcpus: int = 1, memory_mib: int = 128,
                 timeout: float = 600, discovery: str = "cmdline", cmdline: str = "") -> Config:
    """A Config for ``script`` (steps separated by newlines or ';') with each share mounted at
    /mnt/<tag> first; the console goes nowhere but the run's output."""
    return Config(vm=VmConfig(vcpus=vcpus, memory_mib=memory_mib, discovery=discovery),
                  kernel=KernelConfig(path=str(kernel), cmdline=cmdline),
                  guest=GuestConfig(script=exec_to_script(script.replace("\n", ";")),
                                    timeout=timeout),
                  serial=SerialConfig(stdin=False), devices=tuple(shares))


def run_guest(config: Config, *, control_path: str | None = None,
              on_line: Callable[[bytes], None] | None = None) -> tuple[RunResult, str]:
    """Boot ``config`` in this process (from the main thread) and return the result with the
    console text."""
    out = io.BytesIO()
    machine = Machine(config, output=out, control_path=control_path)
    if on_line is not None:
        machine.on_console_line = on_line
    result = machine.run()
    return result, out.getvalue().decode(errors="replace")
