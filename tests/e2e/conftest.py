"""Fixtures that boot real guests on /dev/kvm with the project kernel and an agent script.

`boot(script, shares=..., ...)` runs a Machine in this process (so tests can also check threads
and file descriptors afterwards) and returns its RunResult: parsed agent steps, exit status,
timings and the virtio-fs device counters.
"""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path

import pytest

from devices.virtio.fs.options import FsOptions

KVM = Path(os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"))   # tests of this skip path set it

NO_KVM = ("/dev/kvm is absent: end-to-end guest tests NOT RUN on this machine "
          "(they need KVM; load kvm_intel/kvm_amd or run on a KVM host)")


def pytest_collection_modifyitems(config, items):
    """The only allowed skip: a machine without KVM at all, said loudly for every e2e test."""
    if KVM.exists():
        return
    marker = pytest.mark.skip(reason="!!! " + NO_KVM)
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def kernel() -> Path:
    """The project kernel; built once per machine (about 5 minutes) and cached outside the repo.

    PYVMM_TEST_KERNEL=/path/to/vmlinux runs the suite against another kernel (kernel development).
    """
    if os.environ.get("PYVMM_TEST_KERNEL"):
        return Path(os.environ["PYVMM_TEST_KERNEL"])
    from guest.build import ensure_kernel
    return ensure_kernel(progress=lambda msg: print(f"guest kernel: {msg}", flush=True))


class Booter:
    def __init__(self, kernel: Path):
        self.kernel = kernel
        self.last = None

    def __call__(self, script: str, *, shares: tuple[FsOptions, ...] = (), vcpus: int = 1,
                 memory_mib: int = 128, timeout: float = 600, discovery: str = "cmdline",
                 cmdline: str = "", control_path: str | None = None, on_line=None):
        from vmm.config import Config, GuestConfig, KernelConfig, SerialConfig, VmConfig
        from vmm.machine import Machine
        config = Config(vm=VmConfig(vcpus=vcpus, memory_mib=memory_mib, discovery=discovery),
                        kernel=KernelConfig(path=str(self.kernel), cmdline=cmdline),
                        guest=GuestConfig(script=script, timeout=timeout),
                        serial=SerialConfig(stdin=False), devices=tuple(shares))
        out = io.BytesIO()
        machine = Machine(config, output=out, control_path=control_path)
        if on_line is not None:
            machine.on_console_line = on_line
        result = machine.run()
        result.output = out.getvalue().decode(errors="replace")
        self.last = result
        return result


@pytest.fixture
def boot(kernel) -> Booter:
    return Booter(kernel)


