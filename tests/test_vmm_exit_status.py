"""Which process exit status a VM run gets: the agent's own, unless the run ended in a way that
makes it meaningless. The numbers are documented in the README (Exit status)."""

from __future__ import annotations

import pytest

from guest.console import ConsoleParser
from vmm import exit_status as es
from vmm.vcpu import Stop, StopReason

RESET = Stop(StopReason.GUEST_RESET)


def console(*lines: str) -> ConsoleParser:
    p = ConsoleParser()
    p.feed("".join(line + "\n" for line in lines).encode())
    return p


def test_agent_status_wins_on_a_normal_end():
    assert es.run_exit_status(RESET, console("@@pyvmm exit status=3")) == (3, "")
    assert es.run_exit_status(Stop(StopReason.GUEST_POWEROFF), console("@@pyvmm exit status=0"))[0] == 0


def test_oops_is_reported_but_the_agent_status_kept():
    status, message = es.run_exit_status(
        RESET, console("[ 1.0] BUG: unable to handle page fault", "@@pyvmm exit status=0"))
    assert status == 0 and message.startswith("guest kernel reported: BUG: unable")


@pytest.mark.parametrize("lines", [
    ("[ 2.0] Kernel panic - not syncing: VFS", "@@pyvmm exit status=0"),   # panic beats a status
    ("[ 2.0] BUG: kernel NULL pointer dereference",),                      # fault and no status
])
def test_guest_panic(lines):
    status, message = es.run_exit_status(RESET, console(*lines))
    assert status == es.EXIT_GUEST_PANIC and message.startswith("guest kernel panic: ")


@pytest.mark.parametrize("stop, status", [
    (Stop(StopReason.INTERNAL_ERROR, "vcpu0: suberror 1"), es.EXIT_EMULATION_FAILURE),
    (Stop(StopReason.TIMEOUT, "no exit after 5 s"), es.EXIT_TIMEOUT),
    (Stop(StopReason.SIGNAL, "SIGTERM"), es.EXIT_SIGTERM),
    (Stop(StopReason.SIGNAL, "SIGINT"), es.EXIT_SIGINT),
])
def test_ends_that_override_the_agent(stop, status):
    got, message = es.run_exit_status(stop, console("@@pyvmm exit status=0"))
    assert got == status and stop.reason.value in message


@pytest.mark.parametrize("stop, status", [
    (Stop(StopReason.VCPU_ERROR, "vcpu0: boom"), es.EXIT_VCPU_ERROR),
    (Stop(StopReason.FAIL_ENTRY, "vcpu0: hardware reason 0x21"), es.EXIT_VCPU_ERROR),
    (Stop(StopReason.SHUTDOWN), es.EXIT_NO_STATUS),
    (RESET, es.EXIT_NO_STATUS),
])
def test_no_agent_status(stop, status):
    got, message = es.run_exit_status(stop, console("[ 1.0] booting"))
    assert got == status and stop.reason.value in message


def test_statuses_are_distinct_and_fit_a_byte():
    values = [v for k, v in vars(es).items() if k.startswith("EXIT_")]
    assert len(values) == len(set(values)) and all(0 < v < 256 for v in values)
