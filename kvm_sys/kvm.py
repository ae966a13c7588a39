"""Thin typed wrapper over the KVM ioctl API: one method per ioctl, no policy.

Every ioctl goes through libc's ``ioctl`` via ctypes, with ``errno`` captured and turned into a
``KvmError`` whose message names the ioctl (``KVM_SET_SREGS failed: [Errno 22] Invalid
argument``).  ctypes releases the GIL for the call, so a vCPU thread sitting in ``KVM_RUN`` does
not block the rest of the VMM.  Arguments are passed as ``unsigned long`` (pointers or plain
values), which is what the kernel expects: ``fcntl.ioctl`` would truncate ``KVM_SET_TSS_ADDR``'s
0xfffbd000 to a C int.

Object lifetimes follow the kernel's: ``Kvm`` (the /dev/kvm fd) -> ``Vm`` -> ``Vcpu`` (its fd plus
the shared ``kvm_run`` mapping).  ``close()`` is idempotent everywhere.

Each ioctl is named once, by its generated constant; ``bindings.IOCTL_NAMES`` turns the number back
into the name for error messages.  ``Vcpu.run()`` returns the exit decoded from the ``kvm_run`` page
(``kvm_sys.exits``), so callers never compute offsets into it.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import mmap
import os
from collections.abc import Iterable

from . import bindings as kb
from .exits import RUN_SIZE, RunPage, VcpuExit
from .flex import make_flex

logger = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl_fn = _libc.ioctl
_ioctl_fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl_fn.restype = ctypes.c_int

KVM_API_VERSION = 12
_KVM_RUN = kb.KVM_RUN       # Vcpu.run() is the hot path: no module attribute lookup per call


class KvmError(OSError):
    """A KVM ioctl failed.  ``.errno``/``.strerror`` as for OSError; ``.ioctl`` names the call."""

    def __init__(self, err: int, ioctl: str, detail: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.ioctl = ioctl
        self.detail = detail

    def __str__(self) -> str:
        s = f"{self.ioctl} failed: [Errno {self.errno}] {self.strerror}"
        return f"{s} ({self.detail})" if self.detail else s


class KvmInterrupted(KvmError, InterruptedError):
    """KVM_RUN returned EINTR (a signal or immediate_exit): the caller's loop decides what next."""


def ioctl_name(request: int) -> str:
    """``KVM_RUN`` for ``kb.KVM_RUN``: the generated table names every ioctl the headers define."""
    return kb.IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def _error(request: int) -> KvmError:
    """The exception for a failed ioctl, from the errno ctypes saved right after the call."""
    err = ctypes.get_errno()
    cls = KvmInterrupted if err == errno_mod.EINTR else KvmError
    return cls(err, ioctl_name(request))


def _ioctl(fd: int, request: int,
           arg: int | ctypes.Structure | ctypes.Union | ctypes._SimpleCData = 0) -> int:
    """ioctl(fd, request, arg) -> non-negative result; ``arg`` is a value or a ctypes object."""
    if isinstance(arg, int):
        value = arg
    else:
        value = ctypes.addressof(arg)
    ret = _ioctl_fn(fd, request, value)
    if ret < 0:
        raise _error(request)
    return ret


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as e:  # already closed: nothing to release
        logger.debug("close(%d): %s", fd, e)


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(e.errno or errno_mod.ENODEV, f"open({path})") from e
        self._closed = False
        try:
            version = self.api_version()
        except BaseException:
            self.close()
            raise
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError(errno_mod.EINVAL, ioctl_name(kb.KVM_GET_API_VERSION),
                           f"API version {version}, expected {KVM_API_VERSION}")

    def api_version(self) -> int:
        return _ioctl(self.fd, kb.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, kb.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, kb.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = 256) -> kb.kvm_cpuid2:
        """KVM_GET_SUPPORTED_CPUID; the returned struct has ``nent`` valid entries."""
        n = max_entries
        while True:
            cpuid = make_flex(kb.kvm_cpuid2, n)
            cpuid.nent = n
            try:
                _ioctl(self.fd, kb.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except KvmError as e:
                if e.errno != errno_mod.E2BIG or n >= 65536:
                    raise
                n *= 2

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM saves/restores.  E2BIG tells us the real count."""
        n = 64
        while True:
            lst = make_flex(kb.kvm_msr_list, n)
            lst.nmsrs = n
            try:
                _ioctl(self.fd, kb.KVM_GET_MSR_INDEX_LIST, lst)
                return [lst.indices[i] for i in range(lst.nmsrs)]
            except KvmError as e:
                if e.errno != errno_mod.E2BIG or n >= 65536:
                    raise
                n = max(lst.nmsrs, n * 2)

    def create_vm(self) -> Vm:
        fd = _ioctl(self.fd, kb.KVM_CREATE_VM, 0)
        return Vm(fd, self.vcpu_mmap_size())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _close_fd(self.fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """A VM fd (KVM_CREATE_VM)."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self._closed = False

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, kb.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        r = kb.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                           memory_size=memory_size, userspace_addr=userspace_addr)
        _ioctl(self.fd, kb.KVM_SET_USER_MEMORY_REGION, r)

    def set_tss_addr(self, addr: int) -> None:
        """Three pages KVM uses for real-mode emulation on VMX; must not overlap RAM or MMIO."""
        _ioctl(self.fd, kb.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        v = ctypes.c_uint64(addr)
        _ioctl(self.fd, kb.KVM_SET_IDENTITY_MAP_ADDR, v)

    def create_irqchip(self) -> None:
        _ioctl(self.fd, kb.KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = 0) -> None:
        cfg = kb.kvm_pit_config(flags=flags)
        _ioctl(self.fd, kb.KVM_CREATE_PIT2, cfg)

    def irq_line(self, irq: int, level: int) -> None:
        lvl = kb.kvm_irq_level(irq=irq, level=int(level))
        _ioctl(self.fd, kb.KVM_IRQ_LINE, lvl)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """Writes to eventfd ``fd`` raise ``gsi`` inside the kernel (no VMM round trip)."""
        req = kb.kvm_irqfd(fd=fd, gsi=gsi, flags=kb.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, kb.KVM_IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """Guest writes of ``length`` bytes at ``addr`` (matching ``datamatch``) signal ``fd``."""
        flags = 0
        if datamatch is not None:
            flags |= kb.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= kb.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= kb.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = kb.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        _ioctl(self.fd, kb.KVM_IOEVENTFD, req)

    def get_irqchip(self, chip_id: int) -> kb.kvm_irqchip:
        chip = kb.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, kb.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: kb.kvm_irqchip) -> None:
        _ioctl(self.fd, kb.KVM_SET_IRQCHIP, chip)

    def get_clock(self) -> kb.kvm_clock_data:
        data = kb.kvm_clock_data()
        _ioctl(self.fd, kb.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: kb.kvm_clock_data) -> None:
        _ioctl(self.fd, kb.KVM_SET_CLOCK, data)

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _ioctl(self.fd, kb.KVM_CREATE_VCPU, index)
        try:
            return Vcpu(fd, index, self.vcpu_mmap_size)
        except BaseException:
            _close_fd(fd)
            raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _close_fd(self.fd)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vcpu:
    """A vCPU fd and its shared ``kvm_run`` page(s)."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self.mmap_size = mmap_size
        if mmap_size < RUN_SIZE:
            raise KvmError(errno_mod.EINVAL, ioctl_name(kb.KVM_GET_VCPU_MMAP_SIZE),
                           f"{mmap_size} < sizeof(struct kvm_run)")
        try:
            self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise KvmError(e.errno or errno_mod.EINVAL, "mmap(vcpu)") from e
        # The whole mapping, not just the struct: port I/O data lies beyond sizeof(kvm_run).
        self._page = RunPage(self._mmap)
        self._closed = False

    def run(self) -> VcpuExit:
        """One KVM_RUN, and the exit it reported (see ``kvm_sys.exits``).

        EINTR raises ``KvmInterrupted`` (an ``InterruptedError``).  Views in the returned exit point
        into the kvm_run page and are valid until the next ``run()``.
        """
        if _ioctl_fn(self.fd, _KVM_RUN, 0) < 0:
            raise _error(_KVM_RUN)
        return self._page.decode()

    def set_immediate_exit(self, value: bool) -> None:
        self._page.set_immediate_exit(value)

    @property
    def immediate_exit(self) -> bool:
        return self._page.immediate_exit

    # ---- registers ----------------------------------------------------------------------
    def get_regs(self) -> kb.kvm_regs:
        r = kb.kvm_regs()
        _ioctl(self.fd, kb.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: kb.kvm_regs) -> None:
        _ioctl(self.fd, kb.KVM_SET_REGS, regs)

    def get_sregs(self) -> kb.kvm_sregs:
        s = kb.kvm_sregs()
        _ioctl(self.fd, kb.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: kb.kvm_sregs) -> None:
        _ioctl(self.fd, kb.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kb.kvm_fpu:
        f = kb.kvm_fpu()
        _ioctl(self.fd, kb.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu: kb.kvm_fpu) -> None:
        _ioctl(self.fd, kb.KVM_SET_FPU, fpu)

    def get_lapic(self) -> kb.kvm_lapic_state:
        s = kb.kvm_lapic_state()
        _ioctl(self.fd, kb.KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, lapic: kb.kvm_lapic_state) -> None:
        _ioctl(self.fd, kb.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        s = kb.kvm_mp_state()
        _ioctl(self.fd, kb.KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, state: int | kb.kvm_mp_state) -> None:
        s = state if isinstance(state, kb.kvm_mp_state) else kb.kvm_mp_state(mp_state=state)
        _ioctl(self.fd, kb.KVM_SET_MP_STATE, s)

    def get_vcpu_events(self) -> kb.kvm_vcpu_events:
        e = kb.kvm_vcpu_events()
        _ioctl(self.fd, kb.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, events: kb.kvm_vcpu_events) -> None:
        _ioctl(self.fd, kb.KVM_SET_VCPU_EVENTS, events)

    def set_cpuid2(self, cpuid: kb.kvm_cpuid2) -> None:
        """``cpuid.nent`` entries are used; the struct must have room for them."""
        room = (ctypes.sizeof(cpuid) - type(cpuid).entries.offset) // ctypes.sizeof(kb.kvm_cpuid_entry2)
        if cpuid.nent > room:
            raise KvmError(errno_mod.EINVAL, ioctl_name(kb.KVM_SET_CPUID2), f"nent {cpuid.nent} > room {room}")
        _ioctl(self.fd, kb.KVM_SET_CPUID2, cpuid)

    def set_msrs(self, msrs: Iterable[tuple[int, int]]) -> None:
        items = list(msrs)
        buf = make_flex(kb.kvm_msrs, len(items))
        buf.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            buf.entries[i].index = index
            buf.entries[i].data = value
        done = _ioctl(self.fd, kb.KVM_SET_MSRS, buf)
        if done != len(items):
            # KVM stops at the first MSR it rejects and returns how many it set.
            raise KvmError(errno_mod.EINVAL, ioctl_name(kb.KVM_SET_MSRS),
                           f"MSR {items[done][0]:#x} rejected ({done}/{len(items)} set)")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        idx = list(indices)
        buf = make_flex(kb.kvm_msrs, len(idx))
        buf.nmsrs = len(idx)
        for i, index in enumerate(idx):
            buf.entries[i].index = index
        done = _ioctl(self.fd, kb.KVM_GET_MSRS, buf)
        if done != len(idx):
            raise KvmError(errno_mod.EINVAL, ioctl_name(kb.KVM_GET_MSRS),
                           f"MSR {idx[done]:#x} not readable ({done}/{len(idx)} read)")
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._page.release()    # our view of the mapping; views in exits still alive keep it
        try:
            self._mmap.close()
        except BufferError:
            # Someone still holds a view of kvm_run; the mapping goes away with the last one.
            logger.warning("vcpu%d: kvm_run mapping still referenced; not unmapped", self.index)
        _close_fd(self.fd)

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
