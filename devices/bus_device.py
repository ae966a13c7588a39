"""The interface every port-I/O or MMIO device presents to the VMM's bus.

The bus (vmm/bus.py) owns address decoding; a device only ever sees offsets relative to its own base,
so the same device class can be placed anywhere in the guest-physical or port address space.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BusDevice(Protocol):
    """A device reachable through guest port I/O or MMIO exits.

    Implementations must never raise on guest-controlled input: a bad offset or width is logged and
    ignored (reads return all ones), because an exception here would kill a vCPU thread.
    """

    def read(self, offset: int, size: int) -> bytes:
        """Return exactly `size` bytes read at `offset` (relative to the device's base)."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of `data` at `offset` (relative to the device's base)."""
        ...
