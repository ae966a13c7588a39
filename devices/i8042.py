"""The part of an i8042 keyboard controller a VMM needs: the CPU reset line.

Linux with `reboot=k` writes 0xFE (pulse the reset line) to the command port 0x64 after polling the
status register until the input buffer is empty; we report an empty controller and end the VM on the
reset command, which is how our guests (and Firecracker's) say they are done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

DATA_PORT_OFFSET = 0       # port 0x60
COMMAND_PORT_OFFSET = 4    # port 0x64
IO_SIZE = COMMAND_PORT_OFFSET + 1   # one bus range from the data port to the command port
CMD_READ_OUTPUT_PORT = 0xD0
CMD_RESET_CPU = 0xFE
OUTPUT_PORT_DEFAULT = 0x01  # bit 0: the system-reset line is not asserted


class I8042:
    """Registered over ports 0x60..0x64; offsets are relative to 0x60."""

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._pending: int | None = None   # a byte the guest asked for (read from port 0x60)
        self.resets = 0

    def read(self, offset: int, size: int) -> bytes:
        if offset == COMMAND_PORT_OFFSET:
            # Status: output-buffer-full only when we hold a reply; input buffer always empty.
            value = 0x01 if self._pending is not None else 0x00
        elif offset == DATA_PORT_OFFSET:
            value, self._pending = (self._pending or 0), None
        else:
            value = 0xFF
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset != COMMAND_PORT_OFFSET or not data:
            return
        command = data[0]
        if command == CMD_RESET_CPU:
            self.resets += 1
            logger.debug("i8042: CPU reset requested by the guest")
            self._on_reset()
        elif command == CMD_READ_OUTPUT_PORT:
            self._pending = OUTPUT_PORT_DEFAULT
