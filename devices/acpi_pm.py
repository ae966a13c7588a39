"""ACPI power management for a hardware-reduced guest: sleep control/status and reset on one I/O port.

A HW-reduced ACPI platform has no PM1 blocks, so Linux powers off by writing the FADT's
SLEEP_CONTROL_REG and reboots (reboot=a, or as a fallback) through RESET_REG. Like cloud-hypervisor's
AcpiShutdownDevice, all three registers live on the same 8-bit port (the VMM puts it at 0x600); the
values never collide:

- reset:          RESET_VALUE (1)
- sleep control:  (SLP_TYP << 2) | SLP_EN (bit 5); SLP_TYP 5 (the `\\_S5_` value in our DSDT) = soft off
- sleep status:   writing WAK_STS (bit 7) clears it; Linux does that right before a sleep request and
                  then spins reading the register until WAK_STS is set again.

Linux only registers ACPI power-off in HW-reduced mode if `\\_S5_` exists *and* both the sleep
control and sleep status addresses are set (drivers/acpi/sleep.c `acpi_sleep_state_supported`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

# Register values shared with the FADT (vmm/acpi/fadt.py) and DSDT (vmm/acpi/dsdt.py); the port
# itself is the VMM's choice (vmm/layout.py ACPI_PM_PORT), which it writes into the FADT.
IO_SIZE = 1         # one 8-bit register
RESET_VALUE = 0x01
S5_SLP_TYP = 5  # the first element of \_S5_

SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x1C
SLP_EN = 1 << 5
WAK_STS = 1 << 7


class AcpiPmDevice:
    """BusDevice for the PM port: S5 writes call `on_poweroff`, RESET_VALUE writes call `on_reset`.

    Callbacks run on the vCPU thread that made the write; they should only request the stop (set a
    flag, write an eventfd) and return. A guest that requests a sleep state we do not offer (only S5
    is in the DSDT, so a well-behaved guest never does) gets WAK_STS set at once, i.e. it "wakes"
    immediately instead of spinning forever on the status register.
    """

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._wake_status = False
        self._log = LogThrottle(logger)
        self.poweroff_requests = 0
        self.reset_requests = 0

    def read(self, offset: int, size: int) -> bytes:
        """Sleep status: WAK_STS if a (non-S5) sleep request completed, else 0. Bad accesses read all ones."""
        if offset != 0 or not 1 <= size <= 8:
            self._log_unknown(f"read offset={offset} size={size}")
            return b"\xff" * max(0, size)
        with self._lock:
            status = WAK_STS if self._wake_status else 0
        return bytes([status]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        """Decode a write of the reset value, a sleep request or a WAK_STS clear (low byte only)."""
        if offset != 0 or not 1 <= len(data) <= 8:
            self._log_unknown(f"write offset={offset} len={len(data)}")
            return
        value = data[0]
        if value == RESET_VALUE:
            logger.info("guest requested reset through the ACPI reset register")
            with self._lock:
                self.reset_requests += 1
            self._on_reset()
            return
        if value & SLP_EN:
            slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if slp_typ == S5_SLP_TYP:
                logger.info("guest requested ACPI S5 (power off)")
                with self._lock:
                    self.poweroff_requests += 1
                self._on_poweroff()
            else:
                logger.warning("guest requested unsupported sleep type %d; waking it at once", slp_typ)
                with self._lock:
                    self._wake_status = True
            return
        if value & WAK_STS:
            # Write-1-to-clear, done by Linux before every sleep request.
            with self._lock:
                self._wake_status = False
            return
        if value == 0:
            return
        self._log_unknown(f"write value={value:#04x}")

    def _log_unknown(self, what: str) -> None:
        """Log the first unexpected access at warning level, later ones at debug (a guest can loop)."""
        if not self._log.once("unexpected", logging.WARNING,
                              "acpi_pm: ignoring unexpected guest %s (further ones logged at debug)", what):
            logger.debug("acpi_pm: ignoring unexpected guest %s", what)
