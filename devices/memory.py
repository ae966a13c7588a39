"""Guest memory as devices see it: the access interface every implementation provides.

Devices (virtqueues, descriptor chains, the virtio transports) and the VMM's boot and ACPI code take
addresses straight from the guest, so each access names a guest-physical range and the memory checks
it: a range must lie inside ONE region, otherwise ``GuestMemoryError`` (a ``ValueError``, which
device code catches and turns into an error reply or a dropped request).

The interface lives here, below the VMM (layers point downward: vmm -> devices), so that device code
can be typed against it without importing ``vmm``. ``vmm.memory.GuestMemory`` implements it for guest
RAM the VMM maps itself; a vhost-user backend implements the same interface over regions it maps from
file descriptors sent by its frontend, and nothing above the transport changes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["GuestMemoryAccess", "GuestMemoryError"]


class GuestMemoryError(ValueError):
    """An out-of-range or region-crossing guest memory access."""


@runtime_checkable
class GuestMemoryAccess(Protocol):
    """Bounds-checked access to guest-physical memory; every method raises ``GuestMemoryError``
    for a range that is not inside one region. Integers are little-endian (the guest is x86)."""

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if [gpa, gpa + length) lies inside one region."""
        ...

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa + length): no copy; the guest may change it at any time."""
        ...

    def read(self, gpa: int, length: int) -> bytes:
        """A private copy of [gpa, gpa + length) (use it for data that must not change under you)."""
        ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        ...

    def read_u16(self, gpa: int) -> int:
        ...

    def read_u32(self, gpa: int) -> int:
        ...

    def read_u64(self, gpa: int) -> int:
        ...

    def write_u16(self, gpa: int, value: int) -> None:
        ...

    def write_u32(self, gpa: int, value: int) -> None:
        ...

    def write_u64(self, gpa: int, value: int) -> None:
        ...
