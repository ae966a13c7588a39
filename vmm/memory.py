"""Guest RAM: anonymous host mappings registered as KVM memory slots.

Layout: RAM fills guest-physical memory from 0 up to the 32-bit MMIO hole (3 GiB); whatever is left
goes above 4 GiB.  Each piece is one anonymous ``mmap`` (``MAP_NORESERVE``: the host commits a page
only when the guest or the VMM touches it, so a large guest costs nothing up front) and one KVM slot.

Everything that takes a guest address is hostile-input code: devices pass addresses straight from
virtqueue descriptors.  Every access is checked to lie inside ONE region, and errors are
``GuestMemoryError`` (a ``ValueError``, which device code catches).  Reads and writes go through
memoryviews / ``struct.unpack_from`` on the mapping, so the only copy is the one the caller asks for.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
from dataclasses import dataclass, field

from . import layout

logger = logging.getLogger(__name__)

PAGE_SIZE = 0x1000

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(ValueError):
    """An out-of-range or region-crossing guest memory access."""


@dataclass
class MemoryRegion:
    gpa: int                   # guest-physical start
    size: int                  # bytes
    mmap: mmap.mmap            # host backing
    host_addr: int = 0         # userspace address of the mapping (for KVM_SET_USER_MEMORY_REGION)
    slot: int = 0
    _view: memoryview | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


def split_ram(size: int) -> list[tuple[int, int]]:
    """(gpa, size) pieces of ``size`` bytes of RAM around the [3 GiB, 4 GiB) MMIO hole."""
    low = min(size, layout.MMIO_HOLE_START)
    pieces = [(0, low)]
    if size > low:
        pieces.append((layout.HIGH_RAM_START, size - low))
    return pieces


class GuestMemory:
    """Guest RAM of ``size`` bytes (page multiple), split around the 32-bit MMIO hole."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size <= 0:
            raise GuestMemoryError(f"guest memory size must be a positive integer, got {size!r}")
        if size % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory size {size:#x} is not a multiple of {PAGE_SIZE:#x}")
        self.size = size
        self.regions: list[MemoryRegion] = []
        try:
            for slot, (gpa, length) in enumerate(split_ram(size)):
                mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                               | getattr(mmap, "MAP_NORESERVE", 0),
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
                anchor = ctypes.c_char.from_buffer(mm)   # temporary export just to get the address
                host_addr = ctypes.addressof(anchor)
                del anchor
                self.regions.append(MemoryRegion(gpa, length, mm, host_addr, slot, memoryview(mm)))
        except BaseException:
            self.close()
            raise
        self._closed = False
        logger.debug("guest memory: %s", ", ".join(
            f"[{r.gpa:#x}, {r.end:#x})" for r in self.regions))

    # ---- KVM ----------------------------------------------------------------------------
    def register(self, vm) -> None:
        """Register each region as a KVM memory slot (slot number = region index)."""
        for r in self.regions:
            vm.set_user_memory_region(r.slot, r.gpa, r.size, r.host_addr)

    # ---- lookup -------------------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest access gpa={gpa:#x} length={length}")
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                off = gpa - r.gpa
                if length > r.size - off:
                    raise GuestMemoryError(
                        f"guest access [{gpa:#x}, {gpa + length:#x}) leaves RAM region "
                        f"[{r.gpa:#x}, {r.end:#x})")
                return r, off
        raise GuestMemoryError(f"guest address {gpa:#x} (length {length}) is not in RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if [gpa, gpa+length) lies inside one RAM region."""
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def host_address(self, gpa: int) -> int:
        r, off = self._locate(gpa, 1)
        return r.host_addr + off

    def ram_ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of every RAM region, for the e820 map."""
        return [(r.gpa, r.size) for r in self.regions]

    @property
    def low_ram_end(self) -> int:
        """End of the RAM region starting at 0 (where initrd and boot data must go)."""
        return self.regions[0].end

    # ---- access -------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; the range must lie inside one region."""
        if length == 0 and gpa >= 0:
            return memoryview(b"")  # an empty range lies inside anything
        r, off = self._locate(gpa, length)
        assert r._view is not None, "guest memory is closed"
        return r._view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        n = src.nbytes
        if n == 0:
            if gpa < 0:
                raise GuestMemoryError(f"invalid guest address {gpa:#x}")
            return
        r, off = self._locate(gpa, n)
        assert r._view is not None, "guest memory is closed"
        r._view[off:off + n] = src

    def _unpack(self, s: struct.Struct, gpa: int) -> int:
        r, off = self._locate(gpa, s.size)
        return s.unpack_from(r.mmap, off)[0]

    def _pack(self, s: struct.Struct, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, s.size)
        try:
            s.pack_into(r.mmap, off, value)
        except struct.error as e:
            raise GuestMemoryError(f"value {value!r} does not fit in {s.size} bytes") from e

    def read_u8(self, gpa: int) -> int:
        r, off = self._locate(gpa, 1)
        return r.mmap[off]

    def write_u8(self, gpa: int, value: int) -> None:
        if not 0 <= value <= 0xFF:
            raise GuestMemoryError(f"value {value!r} does not fit in 1 byte")
        r, off = self._locate(gpa, 1)
        r.mmap[off] = value

    def read_u16(self, gpa: int) -> int:
        return self._unpack(_U16, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._unpack(_U32, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._unpack(_U64, gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self._pack(_U16, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._pack(_U32, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._pack(_U64, gpa, value)

    # ---- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Unmap all regions.  Views still held elsewhere keep their mapping alive (logged)."""
        for r in self.regions:
            if r._view is not None:
                r._view.release()
                r._view = None
            try:
                r.mmap.close()
            except BufferError:
                logger.warning("guest memory region at %#x still has live views; left mapped", r.gpa)
        self._closed = True

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
