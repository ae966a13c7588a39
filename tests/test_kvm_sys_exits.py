"""Typed vCPU exits decoded from a kvm_run page, and ioctl names from the generated table.

The page is filled through the generated ctypes struct (field by field, as the kernel would), and
decoded through `RunPage`'s precomputed struct formats: the two paths only agree if the offsets
`kvm_sys.exits` derives from the layout are right. The same decoding against real KVM exits is in
test_kvm_sys_kvm.py and test_boot_cpu.py.
"""

from __future__ import annotations

import pytest

from kvm_sys import (FailEntryExit, InternalErrorExit, IoExit, MmioExit, SimpleExit, SystemEventExit,
                     exit_name, ioctl_name)
from kvm_sys import bindings as kb
from kvm_sys.exits import RUN_SIZE, RunPage

PAGE = 0x2000      # kvm_run, then the PIO data page (KVM puts io.data_offset at 4096)


@pytest.fixture
def page():
    buf = bytearray(PAGE)
    run = kb.kvm_run.from_buffer(buf)
    yield buf, run, RunPage(buf)
    del run


def test_io_out_with_count(page):
    buf, run, rp = page
    run.exit_reason = kb.KVM_EXIT_IO
    run.io.direction = kb.KVM_EXIT_IO_OUT
    run.io.size = 2
    run.io.port = 0x3F8
    run.io.count = 3
    run.io.data_offset = 0x1000
    buf[0x1000:0x1006] = b"abcdef"
    ex = rp.decode()
    assert isinstance(ex, IoExit) and ex.reason == kb.KVM_EXIT_IO and ex.name == "KVM_EXIT_IO"
    assert (ex.port, ex.size, ex.count, ex.is_out) == (0x3F8, 2, 3, True)
    assert bytes(ex.data) == b"abcdef"


def test_io_in_answer_lands_in_the_page(page):
    buf, run, rp = page
    run.exit_reason = kb.KVM_EXIT_IO
    run.io.direction = kb.KVM_EXIT_IO_IN
    run.io.size = 4
    run.io.port = 0x60
    run.io.count = 1
    run.io.data_offset = 0x1800
    ex = rp.decode()
    assert not ex.is_out and len(ex.data) == 4
    ex.data[:] = b"\x01\x02\x03\x04"
    assert buf[0x1800:0x1804] == b"\x01\x02\x03\x04"


def test_io_data_past_the_mapping_comes_out_short(page):
    _, run, rp = page
    run.exit_reason = kb.KVM_EXIT_IO
    run.io.size = 4
    run.io.count = 4
    run.io.data_offset = PAGE - 8
    assert len(rp.decode().data) == 8           # the caller sees 8 != 16 and rejects the exit
    run.io.data_offset = 1 << 40
    assert len(rp.decode().data) == 0


@pytest.mark.parametrize("is_write", [0, 1])
def test_mmio(page, is_write):
    buf, run, rp = page
    run.exit_reason = kb.KVM_EXIT_MMIO
    run.mmio.phys_addr = 0xD000_0070
    run.mmio.len = 4
    run.mmio.is_write = is_write
    run.mmio.data[:4] = [0x78, 0x56, 0x34, 0x12]
    ex = rp.decode()
    assert isinstance(ex, MmioExit)
    assert (ex.address, ex.is_write, bytes(ex.data)) == (0xD000_0070, bool(is_write), b"\x78\x56\x34\x12")
    ex.data[:] = b"wxyz"
    assert bytes(run.mmio.data[:4]) == b"wxyz"


def test_mmio_longer_than_its_data_field_gives_an_empty_view(page):
    _, run, rp = page
    run.exit_reason = kb.KVM_EXIT_MMIO
    run.mmio.len = 9
    assert len(rp.decode().data) == 0


def test_internal_error_data_is_capped(page):
    _, run, rp = page
    run.exit_reason = kb.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = kb.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 3
    for i in range(16):
        run.internal.data[i] = 0x100 + i
    ex = rp.decode()
    assert isinstance(ex, InternalErrorExit)
    assert (ex.suberror, ex.data) == (kb.KVM_INTERNAL_ERROR_EMULATION, (0x100, 0x101, 0x102))
    run.internal.ndata = 1000                   # the kernel never says more than the array holds
    assert rp.decode().data == tuple(0x100 + i for i in range(16))


def test_fail_entry_and_system_event(page):
    _, run, rp = page
    run.exit_reason = kb.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x8000_0021
    run.fail_entry.cpu = 3
    ex = rp.decode()
    assert isinstance(ex, FailEntryExit)
    assert (ex.hardware_entry_failure_reason, ex.cpu) == (0x8000_0021, 3)

    run.exit_reason = kb.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type = kb.KVM_SYSTEM_EVENT_RESET
    run.system_event.ndata = 2
    run.system_event.data[0] = 7
    run.system_event.data[1] = 9
    ex = rp.decode()
    assert isinstance(ex, SystemEventExit)
    assert (ex.type, ex.data) == (kb.KVM_SYSTEM_EVENT_RESET, (7, 9))


@pytest.mark.parametrize("reason", [kb.KVM_EXIT_HLT, kb.KVM_EXIT_SHUTDOWN, kb.KVM_EXIT_INTR, 9999])
def test_reasons_without_payload_share_one_object(page, reason):
    _, run, rp = page
    run.exit_reason = reason
    ex = rp.decode()
    assert isinstance(ex, SimpleExit) and ex.reason == reason
    assert rp.decode() is ex                     # no allocation per HLT/INTR exit
    assert ex.name == (str(reason) if reason == 9999 else exit_name(reason))
    assert ex.name in repr(ex)


def test_immediate_exit_flag(page):
    _, run, rp = page
    rp.set_immediate_exit(True)
    assert run.immediate_exit == 1 and rp.immediate_exit
    rp.set_immediate_exit(False)
    assert run.immediate_exit == 0 and not rp.immediate_exit


def test_short_buffer_is_refused():
    with pytest.raises(ValueError, match="sizeof"):
        RunPage(bytearray(RUN_SIZE - 1))


def test_release_lets_the_buffer_resize():
    buf = bytearray(PAGE)
    rp = RunPage(buf)
    with pytest.raises(BufferError):
        buf.extend(b"x")                         # exported while the page holds its view
    rp.release()
    buf.extend(b"x")


def test_exit_names():
    assert exit_name(kb.KVM_EXIT_HLT) == "KVM_EXIT_HLT"
    assert exit_name(kb.KVM_EXIT_IO) == "KVM_EXIT_IO"           # not KVM_EXIT_IO_IN (a sub-code)
    assert exit_name(123456) == "123456"


def test_ioctl_names_come_from_the_generated_table():
    assert ioctl_name(kb.KVM_RUN) == "KVM_RUN"
    assert ioctl_name(kb.KVM_SET_USER_MEMORY_REGION) == "KVM_SET_USER_MEMORY_REGION"
    assert ioctl_name(kb.KVM_CREATE_VM) == "KVM_CREATE_VM"
    assert ioctl_name(0x1234) == "ioctl 0x1234"
    # Each entry names constants that have exactly its number; both names of a shared number.
    for number, names in kb.IOCTL_NAMES.items():
        assert all(getattr(kb, name) == number for name in names.split(" or ")), names
    assert "KVM_GET_ONE_REG" in ioctl_name(kb.KVM_GET_ONE_REG)
    assert "KVM_ARM_SET_DEVICE_ADDR" in ioctl_name(kb.KVM_GET_ONE_REG)
