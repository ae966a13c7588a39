"""Typed vCPU exits, decoded from the shared ``kvm_run`` page (what kvm-ioctls calls ``VcpuExit``).

After ``KVM_RUN`` returns, the kernel has left the exit reason and one member of the ``kvm_run``
exit union in the page the vCPU fd maps.  ``RunPage.decode()`` turns that into one small object:

- ``IoExit``: port I/O; ``data`` is a writable view of the page's data area (``size * count``
  bytes), so an IN is answered by writing into it before the next ``KVM_RUN``;
- ``MmioExit``: a guest access to an unbacked guest-physical address; ``data`` is the ``len``-byte
  view of ``mmio.data`` (written for a read, before the next ``KVM_RUN``);
- ``SystemEventExit`` (shutdown/reset/crash ... with its data words), ``InternalErrorExit``
  (suberror and data words, e.g. an emulation failure), ``FailEntryExit`` (hardware reason, cpu);
- ``SimpleExit`` for every reason that carries nothing we use (HLT, SHUTDOWN, INTR, ...): one shared
  instance per reason, so those exits allocate nothing.

Every offset and field width comes from the generated ctypes layout (``bindings.kvm_run`` and its
anonymous union members), computed once at import; the per-exit work is one ``struct.unpack_from``
on the mapping plus, for I/O and MMIO, one object and one memoryview slice.  The views are only
valid until the next ``KVM_RUN`` (as kvm-ioctls' borrowed slices are): callers copy what they keep.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from . import bindings as kb

__all__ = [
    "FailEntryExit",
    "InternalErrorExit",
    "IoExit",
    "MmioExit",
    "RunPage",
    "SimpleExit",
    "SystemEventExit",
    "VcpuExit",
    "exit_name",
]

# ---- layout, from the generated bindings ---------------------------------------------------------

_SCALAR_FORMATS = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I",
                   ctypes.c_uint64: "Q"}


def member(cls: Any, name: str) -> tuple[int, Any]:
    """(offset, ctypes type) of member ``name`` of struct/union ``cls``, looking through anonymous
    members the way C (and ctypes' ``_anonymous_``) promotes them."""
    fields = {f[0]: f[1] for f in cls._fields_}
    if name in fields:
        return getattr(cls, name).offset, fields[name]
    for anon in getattr(cls, "_anonymous_", ()):
        try:
            inner_offset, inner_type = member(fields[anon], name)
        except KeyError:
            continue
        return getattr(cls, anon).offset + inner_offset, inner_type
    raise KeyError(f"{cls.__name__} has no member {name!r}")


def _unpacker(cls: Any, names: tuple[str, ...]) -> struct.Struct:
    """A little-endian ``struct.Struct`` reading the scalar members ``names`` of ``cls`` (in offset
    order) from the start of a ``cls``, with pad bytes for whatever lies between them."""
    fmt = "<"
    pos = 0
    for name in names:
        offset, ctype = member(cls, name)
        if offset < pos or ctype not in _SCALAR_FORMATS:
            raise TypeError(f"{cls.__name__}.{name}: not a scalar after the previous member")
        fmt += f"{offset - pos}x" if offset > pos else ""
        fmt += _SCALAR_FORMATS[ctype]
        pos = offset + ctypes.sizeof(ctype)
    return struct.Struct(fmt)


def _union_member(name: str) -> tuple[int, Any]:
    """Offset in ``kvm_run`` and type of one member of the exit union (``io``, ``mmio``, ...)."""
    return member(kb.kvm_run, name)


RUN_SIZE = ctypes.sizeof(kb.kvm_run)
_EXIT_REASON_OFF, _ = member(kb.kvm_run, "exit_reason")
_IMMEDIATE_EXIT_OFF, _ = member(kb.kvm_run, "immediate_exit")
_EXIT_REASON = _unpacker(kb.kvm_run, ("exit_reason",))     # includes the pad bytes before it

_IO_OFF, _io_t = _union_member("io")
_IO = _unpacker(_io_t, ("direction", "size", "port", "count", "data_offset"))

_MMIO_OFF, _mmio_t = _union_member("mmio")
_MMIO = _unpacker(_mmio_t, ("phys_addr", "len", "is_write"))
_MMIO_DATA_OFF = _MMIO_OFF + member(_mmio_t, "data")[0]
_MMIO_DATA_MAX = ctypes.sizeof(member(_mmio_t, "data")[1])

_INTERNAL_OFF, _internal_t = _union_member("internal")
_INTERNAL = _unpacker(_internal_t, ("suberror", "ndata"))
_INTERNAL_DATA_OFF = _INTERNAL_OFF + member(_internal_t, "data")[0]
_INTERNAL_DATA_MAX = member(_internal_t, "data")[1]._length_

# The hot path's names, bound once: no attribute lookups per exit.
_KVM_EXIT_IO = kb.KVM_EXIT_IO
_KVM_EXIT_IO_OUT = kb.KVM_EXIT_IO_OUT
_KVM_EXIT_MMIO = kb.KVM_EXIT_MMIO
_unpack_reason = _EXIT_REASON.unpack_from
_unpack_io = _IO.unpack_from
_unpack_mmio = _MMIO.unpack_from

_FAIL_ENTRY_OFF, _fail_entry_t = _union_member("fail_entry")
_FAIL_ENTRY = _unpacker(_fail_entry_t, ("hardware_entry_failure_reason", "cpu"))

_SYSTEM_EVENT_OFF, _system_event_t = _union_member("system_event")
_SYSTEM_EVENT = _unpacker(_system_event_t, ("type", "ndata"))
_SYSTEM_EVENT_DATA_OFF = _SYSTEM_EVENT_OFF + member(_system_event_t, "data")[0]
_SYSTEM_EVENT_DATA_MAX = member(_system_event_t, "data")[1]._length_

def _words(page: memoryview, offset: int, n: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{n}Q", page, offset) if n else ()


# ---- names ------------------------------------------------------------------------------------------

def _exit_names() -> dict[int, str]:
    prefixes = ("KVM_EXIT_IO_", "KVM_EXIT_HYPERV_", "KVM_EXIT_XEN_")  # sub-codes, not reasons
    names: dict[int, str] = {}
    for name, value in vars(kb).items():
        if name.startswith("KVM_EXIT_") and not name.startswith(prefixes) and isinstance(value, int):
            names.setdefault(value, name)
    return names


_EXIT_NAMES = _exit_names()


def exit_name(reason: int) -> str:
    """``KVM_EXIT_HLT`` for 5; the number itself for a reason these headers do not know."""
    return _EXIT_NAMES.get(reason, str(reason))


# ---- exits ------------------------------------------------------------------------------------------

class VcpuExit:
    """Why ``KVM_RUN`` returned.  ``reason`` is the ``KVM_EXIT_*`` number."""

    __slots__ = ()
    reason: int

    @property
    def name(self) -> str:
        return exit_name(self.reason)

    def __repr__(self) -> str:
        slots: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{s}={getattr(self, s)!r}" for s in slots if s != "reason")
        return f"{type(self).__name__}({self.name}{', ' if fields else ''}{fields})"


class SimpleExit(VcpuExit):
    """An exit whose union member we do not use (HLT, SHUTDOWN, INTR, ...).  One per reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason


class IoExit(VcpuExit):
    """Port I/O: ``count`` accesses of ``size`` bytes (count > 1 for rep ins/outs) at ``port``.
    ``data`` holds ``size * count`` bytes: the values written (OUT) or room for the values read (IN)."""

    __slots__ = ("port", "size", "count", "is_out", "data")
    reason = kb.KVM_EXIT_IO

    def __init__(self, port: int, size: int, count: int, is_out: bool, data: memoryview) -> None:
        self.port = port
        self.size = size
        self.count = count
        self.is_out = is_out
        self.data = data


class MmioExit(VcpuExit):
    """A ``len(data)``-byte guest access at ``address`` that no memory slot backs."""

    __slots__ = ("address", "is_write", "data")
    reason = kb.KVM_EXIT_MMIO

    def __init__(self, address: int, is_write: bool, data: memoryview) -> None:
        self.address = address
        self.is_write = is_write
        self.data = data


class SystemEventExit(VcpuExit):
    """``KVM_SYSTEM_EVENT_*`` ``type`` (shutdown, reset, crash ...) and its data words."""

    __slots__ = ("type", "data")
    reason = kb.KVM_EXIT_SYSTEM_EVENT

    def __init__(self, type: int, data: tuple[int, ...]) -> None:  # noqa: A002 - the UAPI name
        self.type = type
        self.data = data


class InternalErrorExit(VcpuExit):
    """KVM could not go on (``KVM_INTERNAL_ERROR_*`` ``suberror``, e.g. an emulation failure)."""

    __slots__ = ("suberror", "data")
    reason = kb.KVM_EXIT_INTERNAL_ERROR

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror = suberror
        self.data = data


class FailEntryExit(VcpuExit):
    """The hardware refused to enter the guest (VMX/SVM entry failure code)."""

    __slots__ = ("hardware_entry_failure_reason", "cpu")
    reason = kb.KVM_EXIT_FAIL_ENTRY

    def __init__(self, hardware_entry_failure_reason: int, cpu: int) -> None:
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu


_SIMPLE: dict[int, SimpleExit] = {}


def _simple(reason: int) -> SimpleExit:
    ex = _SIMPLE.get(reason)
    if ex is None:
        ex = _SIMPLE.setdefault(reason, SimpleExit(reason))
    return ex


# ---- the page ---------------------------------------------------------------------------------------

class RunPage:
    """Decoder over a ``kvm_run`` mapping (or any buffer of its layout, for tests).

    Holds one memoryview of the whole mapping; ``release()`` drops it so the mapping can be closed
    (views handed out in exits keep it alive until they are gone).
    """

    __slots__ = ("view",)

    def __init__(self, buffer) -> None:
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if len(view) < RUN_SIZE:
            raise ValueError(f"kvm_run buffer of {len(view)} bytes < sizeof(struct kvm_run) {RUN_SIZE}")
        self.view = view

    @property
    def exit_reason(self) -> int:
        return _EXIT_REASON.unpack_from(self.view, 0)[0]

    def set_immediate_exit(self, value: bool) -> None:
        """KVM_RUN returns EINTR at once while this is set (closes the race with a kick signal)."""
        self.view[_IMMEDIATE_EXIT_OFF] = 1 if value else 0

    @property
    def immediate_exit(self) -> bool:
        return bool(self.view[_IMMEDIATE_EXIT_OFF])

    def decode(self) -> VcpuExit:
        """The exit KVM_RUN just reported.

        I/O and MMIO (every exit of a running guest, nearly) are decoded inline. Lengths and offsets
        come from the kernel; a data slice past the end of the mapping comes out short rather than
        raising, and the caller checks ``len(data)``.
        """
        view = self.view
        reason = _unpack_reason(view, 0)[0]
        if reason == _KVM_EXIT_IO:
            direction, size, port, count, data_offset = _unpack_io(view, _IO_OFF)
            return IoExit(port, size, count, direction == _KVM_EXIT_IO_OUT,
                          view[data_offset:data_offset + size * count])
        if reason == _KVM_EXIT_MMIO:
            address, length, is_write = _unpack_mmio(view, _MMIO_OFF)
            if length > _MMIO_DATA_MAX:
                length = 0          # longer than mmio.data: an empty view, which callers reject
            return MmioExit(address, is_write != 0, view[_MMIO_DATA_OFF:_MMIO_DATA_OFF + length])
        return self._decode_rare(reason)

    def _decode_rare(self, reason: int) -> VcpuExit:
        view = self.view
        if reason == kb.KVM_EXIT_SYSTEM_EVENT:
            kind, ndata = _SYSTEM_EVENT.unpack_from(view, _SYSTEM_EVENT_OFF)
            return SystemEventExit(kind, _words(view, _SYSTEM_EVENT_DATA_OFF,
                                                min(ndata, _SYSTEM_EVENT_DATA_MAX)))
        if reason == kb.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = _INTERNAL.unpack_from(view, _INTERNAL_OFF)
            return InternalErrorExit(suberror, _words(view, _INTERNAL_DATA_OFF,
                                                      min(ndata, _INTERNAL_DATA_MAX)))
        if reason == kb.KVM_EXIT_FAIL_ENTRY:
            hw, cpu = _FAIL_ENTRY.unpack_from(view, _FAIL_ENTRY_OFF)
            return FailEntryExit(hw, cpu)
        return _simple(reason)

    def release(self) -> None:
        self.view.release()
