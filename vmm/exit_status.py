"""The VMM process's exit statuses, and the rule that picks one when a VM run ends.

The README documents these numbers; scripts and the e2e tests depend on them. The agent's own
status (``exit N`` in the guest script) wins unless the run ended in a way that makes it meaningless
(a kernel panic, an emulation failure, a timeout, a device back-end that went away, or a signal
from outside).
"""

from __future__ import annotations

from guest.console import ConsoleParser

from .vcpu import Stop, StopReason

EXIT_FAILURE = 1              # the VMM could not run the VM (KVM, kernel build ...)
EXIT_USAGE = 2                # bad configuration or arguments
EXIT_GUEST_PANIC = 110
EXIT_EMULATION_FAILURE = 111
EXIT_NO_STATUS = 112          # the guest stopped without an agent exit status
EXIT_VCPU_ERROR = 113
EXIT_DEVICE_LOST = 114        # a device's back-end process (vhost-user) went away mid-run
EXIT_TIMEOUT = 124            # guest.timeout, as timeout(1)
EXIT_SIGINT = 130             # 128 + the signal, as a shell reports it
EXIT_SIGTERM = 143


def run_exit_status(stop: Stop, parser: ConsoleParser) -> tuple[int, str]:
    """(process exit status, one-line message for stderr) for a run that ended with ``stop``,
    given what the guest console showed (the agent's status, kernel faults)."""
    status = parser.exit_status
    message = ""
    panics = [f for f in parser.faults if "Kernel panic" in f]
    if parser.faults and not panics:
        # BUG:/Oops lines: the guest kernel went on; report them but keep the agent's verdict.
        message = "guest kernel reported: " + "; ".join(parser.faults[:3]) + "\n"
    if panics or (parser.faults and status is None):
        return EXIT_GUEST_PANIC, f"guest kernel panic: {(panics or parser.faults)[0]}"
    if stop.reason is StopReason.INTERNAL_ERROR:
        return EXIT_EMULATION_FAILURE, f"{stop.reason.value}: {stop.detail}"
    if stop.reason is StopReason.TIMEOUT:
        return EXIT_TIMEOUT, f"guest {stop.reason.value}: {stop.detail}"
    if stop.reason is StopReason.DEVICE_LOST:
        return EXIT_DEVICE_LOST, stop.detail
    if stop.reason is StopReason.SIGNAL:
        return (EXIT_SIGTERM if stop.detail == "SIGTERM" else EXIT_SIGINT,
                f"{stop.reason.value} ({stop.detail})")
    if status is not None:
        return status, message.rstrip()
    if stop.reason in (StopReason.VCPU_ERROR, StopReason.FAIL_ENTRY):
        return EXIT_VCPU_ERROR, f"{stop.reason.value}: {stop.detail}"
    return EXIT_NO_STATUS, f"guest stopped ({stop.reason.value}) without an agent exit status"
