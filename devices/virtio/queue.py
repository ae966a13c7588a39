"""Split virtqueues (virtio 1.2 sec. 2.7) as seen from the device side.

Everything here reads guest-controlled memory, so every index, address and length is checked before
it is used. A malformed descriptor chain raises `InvalidChain` carrying its head index: the caller
logs it once and returns the chain to the guest with 0 bytes written, so one bad request never stops
the queue. A corrupt ring (the available index jumping by more than the queue size) raises
`QueueBroken`: nothing sensible can be popped from such a queue until the driver resets the device.

Memory ordering: the guest runs on other CPUs and shares the rings with us. On x86 (TSO) loads are
not reordered with loads and stores not with stores, and every guest-memory access here is an opaque
C call (struct/memoryview), so program order is kept for those. The one reordering x86 allows is a
later load passing an earlier store; the two places that need store->load order (publishing
avail_event / the used index, then reading the driver's flags or index) go through `_full_fence()`.

Ring indices cannot tear. The driver updates avail->idx with one aligned 16-bit store (and reads
used->idx the same way), and so do we: `Queue()` checks the rings' alignment (available ring 2 bytes,
used ring 4), so every 16-bit field sits at an even address, and `_U16` ("<H") on a little-endian host
is served by CPython's native unpack/pack functions (the struct module swaps them into its
little-endian table when the sizes match), each a fixed-size 2-byte memcpy that compiles to a single
16-bit load or store (`movzwl` / `movw` in this host's _struct module). Aligned 16-bit accesses are
atomic on x86 (Intel SDM vol. 3A, "Guaranteed Atomic Operations"), so we read the old index or the
new one, never a mix of their bytes; an old one is harmless, as the next notification (or the
EVENT_IDX re-check in `pop`) reads it again.
"""

from __future__ import annotations

import logging
import struct
import threading

from devices.memory import GuestMemoryAccess

logger = logging.getLogger(__name__)

# linux/virtio_ring.h
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768  # virtio 1.2: Queue Size is at most 32768 for split rings
# Linux may build an indirect table longer than a small ring (it only warns without INDIRECT_DESC),
# so the indirect limit is a fixed cap rather than the queue size.
MAX_INDIRECT_DESCRIPTORS = 1024
MAX_CHAIN_BYTES = 0xFFFFFFFF  # the used element's len is a u32

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")

_fence_lock = threading.Lock()


def _full_fence() -> None:
    """Order earlier stores before later loads (a full barrier).

    CPython has no fence primitive; acquiring an uncontended lock executes a locked read-modify-write
    (sem_trywait/pthread mutex), which is a full barrier on x86, and the surrounding C calls keep the
    compiler from moving the guest-memory accesses across it.
    """
    with _fence_lock:
        pass


class QueueConfigError(ValueError):
    """The driver configured a queue we cannot use (bad size, alignment or address)."""


class QueueBroken(Exception):
    """The ring itself is corrupt; the device needs a reset by the driver."""


class InvalidChain(Exception):
    """A malformed descriptor chain; `head` is what must be returned on the used ring."""

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"invalid descriptor chain (head {head}): {reason}")
        self.head = head
        self.reason = reason


class DescriptorChain:
    """One validated request: device-readable buffers, then device-writable buffers.

    The buffers are views straight into guest memory (no copies); zero-length descriptors are dropped.
    A plain class with slots rather than a dataclass with list factories: one is built per request.
    """

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[memoryview] | None = None,
                 writable: list[memoryview] | None = None) -> None:
        self.head = head
        self.readable: list[memoryview] = [] if readable is None else readable
        self.writable: list[memoryview] = [] if writable is None else writable

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={self.readable_len} bytes, "
                f"writable={self.writable_len} bytes)")

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def release(self) -> None:
        """Drop the guest-memory views early (so guest memory can be unmapped)."""
        for v in self.readable + self.writable:
            v.release()
        self.readable.clear()
        self.writable.clear()


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, available ring, used ring) for a queue of `size` entries.

    Both rings include the trailing event word (used_event / avail_event), which the driver lays out
    whether or not EVENT_IDX is negotiated.
    """
    return DESC_SIZE * size, 4 + 2 * size + 2, 4 + USED_ELEM_SIZE * size + 2


class Queue:
    """A split virtqueue whose rings live in guest memory.

    Construction validates the layout (size a power of two <= 32768, alignment 16/2/4, and every ring
    inside one guest memory region) and raises `QueueConfigError` otherwise. Only one thread may
    pop/add_used at a time (the device's worker); no internal locking.
    """

    def __init__(self, memory: GuestMemoryAccess, size: int, desc_table: int, avail_ring: int, used_ring: int,
                 event_idx: bool, *, indirect: bool = False) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueConfigError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        for name, addr, align in (("descriptor table", desc_table, 16), ("available ring", avail_ring, 2),
                                  ("used ring", used_ring, 4)):
            if addr % align:
                raise QueueConfigError(f"{name} address {addr:#x} is not {align}-byte aligned")
        desc_len, avail_len, used_len = ring_sizes(size)
        try:
            self._desc = memory.view(desc_table, desc_len)
            self._avail = memory.view(avail_ring, avail_len)
            self._used = memory.view(used_ring, used_len)
        except ValueError as e:
            raise QueueConfigError(f"queue rings outside guest memory: {e}") from None
        self.memory = memory
        self.size = size
        self.desc_table = desc_table
        self.avail_ring = avail_ring
        self.used_ring = used_ring
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = 0  # free-running 16-bit index of the next available entry to consume
        self.next_used = 0  # free-running 16-bit used index we publish
        self._signalled_used = 0  # used index at the last needs_notification()
        self._avail_event_off = 4 + USED_ELEM_SIZE * size

    # -- driver-written fields -------------------------------------------------------------------
    def _avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def _avail_flags(self) -> int:
        return _U16.unpack_from(self._avail, 0)[0]

    def _used_event(self) -> int:
        return _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]

    # -- device side ------------------------------------------------------------------------------
    def set_avail_event(self, idx: int) -> None:
        """Ask the driver (EVENT_IDX) to notify us once it publishes available entry `idx`."""
        _U16.pack_into(self._used, self._avail_event_off, idx & 0xFFFF)

    def pending(self) -> int:
        """How many available entries the driver has published that we have not popped."""
        return (self._avail_idx() - self.next_avail) & 0xFFFF

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None if the ring is empty.

        With EVENT_IDX, an empty ring re-arms avail_event and checks once more, so a buffer published
        between our check and the re-arm is not missed (the driver may not kick for it).
        Raises `InvalidChain` (the entry is consumed; return `exc.head` to the guest) or `QueueBroken`.
        """
        # pending() and set_avail_event() written out: pop runs twice per request (the second
        # time to find the ring empty), and each call shows on a worker that runs cold.
        avail = self._avail
        next_avail = self.next_avail
        pending = (_U16.unpack_from(avail, 2)[0] - next_avail) & 0xFFFF
        if pending == 0:
            if not self.event_idx:
                return None
            _U16.pack_into(self._used, self._avail_event_off, next_avail)
            _full_fence()
            pending = (_U16.unpack_from(avail, 2)[0] - next_avail) & 0xFFFF
            if pending == 0:
                return None
        if pending > self.size:
            raise QueueBroken(f"available index moved by {pending} entries on a queue of {self.size}")
        head = _U16.unpack_from(avail, 4 + 2 * (next_avail % self.size))[0]
        self.next_avail = (next_avail + 1) & 0xFFFF
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise InvalidChain(head, f"head index {head} >= queue size {self.size}")
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        chain = DescriptorChain(head, readable, writable)
        view_of = self.memory.view
        table: memoryview | bytes = self._desc
        table_len = self.size
        in_indirect = False
        index = head
        visited = 0
        total = 0
        while True:
            visited += 1
            if visited > table_len:
                raise InvalidChain(head, "descriptor loop (chain longer than its table)")
            addr, length, flags, nxt = _DESC.unpack_from(table, index * DESC_SIZE)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise InvalidChain(head, "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
                if in_indirect:
                    raise InvalidChain(head, "nested indirect descriptor")
                if flags & VRING_DESC_F_NEXT:
                    raise InvalidChain(head, "indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise InvalidChain(head, f"indirect table length {length} not a non-zero multiple of 16")
                if length // DESC_SIZE > MAX_INDIRECT_DESCRIPTORS:
                    raise InvalidChain(head, f"indirect table of {length // DESC_SIZE} descriptors")
                try:
                    # A private copy: the driver must not change the table under us (TOCTOU).
                    table = self.memory.read(addr, length)
                except ValueError:
                    raise InvalidChain(head, "indirect table outside guest memory") from None
                table_len = length // DESC_SIZE
                in_indirect = True
                index = 0
                visited = 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise InvalidChain(head, "chain length overflows 32 bits")
            try:
                view = view_of(addr, length)
            except ValueError:
                raise InvalidChain(head, "descriptor buffer outside guest memory") from None
            if flags & VRING_DESC_F_WRITE:
                if length:
                    writable.append(view)
            else:
                if writable:
                    raise InvalidChain(head, "device-readable descriptor after a writable one")
                if length:
                    readable.append(view)
            if not flags & VRING_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise InvalidChain(head, f"next index {nxt} out of range ({table_len})")
            index = nxt

    def add_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes: the element first, then the index."""
        if not 0 <= written <= MAX_CHAIN_BYTES:
            raise ValueError(f"used length {written} out of range")
        slot = self.next_used % self.size
        _USED_ELEM.pack_into(self._used, 4 + USED_ELEM_SIZE * slot, head, written)
        self.next_used = (self.next_used + 1) & 0xFFFF
        # x86 keeps store order, so the element is visible before the index that publishes it.
        _U16.pack_into(self._used, 2, self.next_used)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last call.

        EVENT_IDX: vring_need_event(used_event, new, old); otherwise VRING_AVAIL_F_NO_INTERRUPT.
        """
        _full_fence()  # our used-index store must be visible before we read the driver's wish
        new = self.next_used
        old = self._signalled_used
        self._signalled_used = new
        if old == new:
            return False
        if not self.event_idx:
            return not self._avail_flags() & VRING_AVAIL_F_NO_INTERRUPT
        event = self._used_event()
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def close(self) -> None:
        """Release the ring views so guest memory can be unmapped after a reset."""
        for v in (self._desc, self._avail, self._used):
            v.release()
