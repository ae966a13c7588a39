"""pyvmm's pytest plugin: boot a real guest from a test and assert on what reached the host.

Installed with the package (entry point ``pytest11: pyvmm = vmm.testing``), so any test in an
environment where pyvmm is installed can ask for these fixtures:

* ``guest``: a :class:`GuestRunner`; ``guest.run(script, shares=[Share(...)])`` boots the project
  kernel with an agent script (the ops in ``guest/README.md``) and returns a :class:`GuestResult`.
* ``vm_share``: ``vm_share("data", negative_timeout=60, files={"a.txt": b"..."})`` makes a fresh
  directory under the test's tmp_path and returns a :class:`Share` for it.
* ``guest_kernel``: the kernel, built (about 5 minutes, once per machine) or found in the cache
  once per session.

A complete test::

    from vmm.testing import Share

    def test_missing_names_are_cached(guest, tmp_path):
        result = guest.run("stat /mnt/data/missing x100 expect=ENOENT",
                           shares=[Share(tmp_path, "data", negative_timeout=60)])
        result.check()                                   # exit 0, every step as expected
        assert result.device("data").lookups == 1        # 99 stats answered by the guest
        assert result.device("data").lookups_of("missing") == 1

Guest tests need ``/dev/kvm``: where it is absent they are skipped, each with the reason, and the
session summary says so once. When a test that used ``guest`` fails, the report shows the last
guest's console and exit message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

KVM_DEVICE = Path(os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"))
NO_KVM = ("/dev/kvm is absent: guest tests NOT RUN on this machine (they need KVM; load "
          "kvm_intel/kvm_amd, or run on a KVM host)")
CONSOLE_TAIL_LINES = 120


#: How a share reaches the guest: the device in the VMM process (``mmio``), our device as a
#: separate back-end process over vhost-user (``vhost-user``: ``python -m vmm device fs``), or C
#: virtiofsd over vhost-user (``virtiofsd``: the reference server; it keeps no request counters).
TRANSPORTS = ("mmio", "vhost-user", "virtiofsd")


class Share:
    """A host directory shared with the guest at ``/mnt/<tag>``, with virtio-fs device options
    (the keys of a ``type: fs`` device: negative_timeout, timeout, cache, writeback, ...).
    Options are checked at once: a bad one raises ValueError naming it.

    ``transport`` (one of ``TRANSPORTS``; None: the run's default, ``mmio`` unless
    ``guest.run(transport=...)`` says otherwise) picks who serves it; for the back-end transports
    the runner starts the process before the boot and stops it after."""

    def __init__(self, path: str | os.PathLike[str], tag: str = "share", *,
                 transport: str | None = None, **options: Any) -> None:
        from devices.virtio.fs.options import FsOptions

        if transport is not None and transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.path = Path(path)
        self.tag = tag
        self.transport = transport
        self.options = FsOptions(source=str(self.path), tag=tag, **options)

    def __repr__(self) -> str:
        return f"Share({str(self.path)!r}, {self.tag!r}, transport={self.transport!r})"


@dataclass(frozen=True)
class DeviceStats:
    """What one virtio-fs device counted during the run (the same counters as ``--metrics``)."""

    tag: str
    raw: Mapping[str, Any]

    @property
    def ops(self) -> dict[str, int]:
        """Requests per FUSE opcode name ("LOOKUP", "GETATTR", ...)."""
        return dict(self.raw["ops"])

    def count(self, opcode: str) -> int:
        return int(self.raw["ops"].get(opcode.upper(), 0))

    @property
    def lookups(self) -> int:
        """LOOKUP requests that reached the host."""
        return self.count("LOOKUP")

    def lookups_of(self, name: str) -> int:
        """LOOKUPs of one name (a single path component) that reached the host."""
        return int(self.raw["lookups_by_name"].get(name, 0))

    @property
    def errors(self) -> dict[str, int]:
        """Error replies per errno name ("ENOENT", ...)."""
        return dict(self.raw["errors"])

    def __getattr__(self, key: str) -> Any:
        # lookup_negative, lookup_enoent, bytes_read, requests, virtio, ...
        try:
            return self.raw[key]
        except KeyError:
            raise AttributeError(key) from None


class GuestResult:
    """One guest run: the agent's steps, the exit status, the console and the device counters."""

    def __init__(self, run: Any, output: str) -> None:
        self.run_result = run
        self.output = output

    @property
    def exit_status(self) -> int:
        """The agent's status (``exit N``), or the VMM's status when the guest gave none."""
        return int(self.run_result.exit_status)

    @property
    def steps(self) -> list[Any]:
        """Parsed agent step lines (``guest.console.AgentLine``): .op, .ok, .errno_name, .extra."""
        return list(self.run_result.steps)

    def steps_of(self, op: str) -> list[Any]:
        return [s for s in self.run_result.steps if s.op == op]

    @property
    def message(self) -> str:
        return str(self.run_result.message)

    @property
    def stop(self) -> Any:
        """Why the VMM stopped (``vmm.machine.Stop``: .reason, .detail)."""
        return self.run_result.stop

    @property
    def cmdline(self) -> str:
        """The kernel command line the VMM booted the guest with."""
        return str(self.run_result.cmdline)

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.run_result.metrics)

    @property
    def timings(self) -> dict[str, Any]:
        return dict(self.run_result.timings)

    @property
    def console(self) -> Any:
        return self.run_result.console

    def device(self, tag: str) -> DeviceStats:
        """What the device serving ``tag`` counted (for a ``vhost-user`` share: the back-end
        process's counters, read over its control socket before it was stopped)."""
        try:
            raw = self.run_result.metrics[f"fs:{tag}"]
        except KeyError:
            known = sorted(k[3:] for k in self.run_result.metrics if k.startswith("fs:"))
            raise KeyError(f"no shared directory tagged {tag!r} in this run (tags: {known})") from None
        if "ops" not in raw:
            raise KeyError(f"the server of share {tag!r} keeps no request counters (C virtiofsd)")
        return DeviceStats(tag, raw)

    def check(self) -> GuestResult:
        """Raise AssertionError (with the console tail) unless the script ran to exit 0 with
        every step as expected and no guest fault."""
        failed = [s.raw for s in self.run_result.steps if not s.ok]
        faults = list(self.run_result.console.parser.faults)
        if self.exit_status != 0 or failed or faults:
            raise AssertionError(
                f"guest run failed: exit status {self.exit_status} ({self.message}); "
                f"failed steps {failed}; faults {faults}\n--- console tail ---\n"
                + console_tail(self.output))
        return self


def console_tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class GuestRunner:
    """The ``guest`` fixture: boots guests with one kernel; ``last`` is the latest result."""

    def __init__(self, kernel: Path) -> None:
        self.kernel = kernel
        self.last: GuestResult | None = None

    def run(self, script: str, *, shares: Iterable[Share | Any] = (), vcpus: int = 1,
            memory_mib: int = 128, timeout: float = 600, discovery: str = "cmdline",
            cmdline: str = "", control_path: str | None = None,
            on_line: Callable[[bytes], None] | None = None,
            transport: str = "mmio") -> GuestResult:
        """Boot, run ``script`` (agent ops, one per line or separated by ';'), return the result.

        Each share is mounted at ``/mnt/<tag>`` before the script runs. ``shares`` takes
        :class:`Share` objects (or ``FsOptions``). ``on_line`` sees every console line as it
        arrives (tests use it to act on the host at a precise point of the script).
        ``transport`` is the default for shares that do not name one (see ``TRANSPORTS``)."""
        import contextlib

        from vmm.runner import guest_config, run_guest

        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        with contextlib.ExitStack() as stack:
            servers = _BackendServers(stack)
            devices = tuple(servers.device_for(s.options if isinstance(s, Share) else s,
                                               (s.transport if isinstance(s, Share) else None)
                                               or transport)
                            for s in shares)
            config = guest_config(script, devices, kernel=self.kernel, vcpus=vcpus,
                                  memory_mib=memory_mib, timeout=timeout, discovery=discovery,
                                  cmdline=cmdline)
            run, output = run_guest(config, control_path=control_path, on_line=on_line)
            servers.collect(run.metrics)
        self.last = GuestResult(run, output)
        return self.last


class _BackendServers:
    """The back-end processes of one run's vhost-user shares: started before the boot, their
    counters read into the run's metrics after it, stopped (SIGTERM, status checked) at the end."""

    def __init__(self, stack: Any) -> None:
        import shutil
        import tempfile

        self.stack = stack
        # Short paths: a Unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
        self.workdir = Path(tempfile.mkdtemp(prefix="pyvmm-vu-"))
        stack.callback(shutil.rmtree, self.workdir, True)
        self.servers: list[Any] = []

    def device_for(self, options: Any, transport: str) -> Any:
        """The VM's device for a share: ``options`` itself (mmio) or a vhost-user-fs device on
        the socket of a back-end started here."""
        if transport == "mmio":
            return options
        from devices.virtio.vhost_user.frontend import VhostUserFsOptions
        from vmm.qemu import BackendProcess, VirtiofsdProcess

        server: BackendProcess | VirtiofsdProcess
        if transport == "vhost-user":
            server = BackendProcess(options, self.workdir)
        else:
            server = VirtiofsdProcess(options, self.workdir)
        self.stack.callback(self._stop, server)
        server.start()
        self.servers.append(server)
        return VhostUserFsOptions(socket=str(server.socket), tag=options.tag,
                                  num_request_queues=options.num_request_queues)

    def collect(self, metrics: dict[str, Any]) -> None:
        """Put each live back-end's own counters under ``fs:TAG`` (beside the front-end's)."""
        for server in self.servers:
            stats = getattr(server, "stats", None)
            if stats is None or not server.alive():
                continue
            key = f"fs:{server.options.tag}"
            metrics[key] = {**stats(), **metrics.get(key, {})}

    @staticmethod
    def _stop(server: Any) -> None:
        status = server.stop()
        if getattr(server, "stats", None) is not None and status != 0:   # ours must end cleanly
            raise AssertionError(f"back-end for {server.options.tag!r} exited with {status}:\n"
                                 + server.log_tail())


def _kvm_or_skip() -> None:
    if not KVM_DEVICE.exists():
        pytest.skip("!!! " + NO_KVM)


@pytest.fixture(scope="session")
def guest_kernel() -> Path:
    """The project kernel: PYVMM_TEST_KERNEL if set, else built once per machine and cached."""
    _kvm_or_skip()
    if os.environ.get("PYVMM_TEST_KERNEL"):
        return Path(os.environ["PYVMM_TEST_KERNEL"])
    from guest.build import ensure_kernel

    return ensure_kernel(progress=lambda msg: print(f"guest kernel: {msg}", flush=True))


@pytest.fixture
def guest(guest_kernel: Path) -> GuestRunner:
    return GuestRunner(guest_kernel)


@pytest.fixture
def vm_share(tmp_path: Path) -> Callable[..., Share]:
    """``vm_share(tag="share", files=None, **options)``: a new directory holding ``files``
    (name -> bytes, subdirectories created), shared under ``tag``."""
    def make(tag: str = "share", files: Mapping[str, bytes] | None = None,
             **options: Any) -> Share:
        root = tmp_path / f"vm_share-{tag}"
        root.mkdir()
        for name, data in (files or {}).items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return Share(root, tag, **options)
    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    runner = getattr(item, "funcargs", {}).get("guest")
    if isinstance(runner, GuestRunner) and runner.last is not None:
        last = runner.last
        report.sections.append((
            "guest console (last run)",
            f"exit status {last.exit_status}: {last.message}\n{console_tail(last.output)}"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not KVM_DEVICE.exists() and any(NO_KVM in str(getattr(r, "longrepr", "")) for r in skipped):
        terminalreporter.write_line("!!! " + NO_KVM, red=True, bold=True)
