"""The legacy devices and the bus, driven the way the guest drives them."""

from __future__ import annotations

import threading

import pytest

from devices.i8042 import I8042
from devices.serial import Serial
from vmm.bus import Bus, BusError


class Out:
    def __init__(self):
        self.data = bytearray()

    def __call__(self, b: bytes) -> None:
        self.data += b


def test_serial_output_and_lsr():
    out = Out()
    s = Serial(out)
    for ch in b"hi\n":
        s.write(0, bytes([ch]))
    assert bytes(out.data) == b"hi\n"
    assert s.read(5, 1)[0] & 0x60 == 0x60      # THRE|TEMT: the driver may send the next byte


def test_serial_output_callback_may_read_the_counters():
    # A console line callback (a test's on_line, the control socket's stats) reads the
    # UART's counters while the guest is mid-write: the lock must not be held around output.
    seen = []
    holder = {}

    def out(data: bytes) -> None:
        t = threading.Thread(target=lambda: seen.append(holder["s"].input_counters()))
        t.start()
        t.join(2.0)
        assert not t.is_alive(), "console output ran with the UART lock held"

    holder["s"] = s = Serial(out)
    s.write(0, b"x")
    assert seen == [{"rx_queued": 0, "rx_delivered": 0, "rx_dropped": 0}]


def test_serial_scratch_ier_and_divisor_latch():
    s = Serial(Out())
    s.write(7, b"\xa5")
    assert s.read(7, 1) == b"\xa5"
    s.write(1, b"\xff")
    assert s.read(1, 1) == b"\x0f"               # only the four defined IER bits stick
    s.write(3, b"\x80")                           # DLAB
    s.write(0, b"\x01")
    s.write(1, b"\x00")
    assert s.read(0, 1) == b"\x01" and s.read(1, 1) == b"\x00"
    s.write(3, b"\x03")
    assert s.read(1, 1) == b"\x0f"


def test_serial_loopback_msr_like_linux_autoconfig():
    s = Serial(Out())
    s.write(4, bytes([0x10]))                     # loop, all outputs off
    assert s.read(6, 1)[0] & 0xF0 == 0
    s.write(4, bytes([0x10 | 0x0A]))              # loop + OUT2 + RTS
    assert s.read(6, 1)[0] & 0xF0 == 0x90


def test_serial_fifo_iir_and_thr_interrupt():
    irqs = []
    s = Serial(Out(), irq=lambda: irqs.append(1))
    s.write(2, b"\x07")
    assert s.read(2, 1)[0] & 0xC0 == 0xC0         # 16550A: FIFOs enabled
    s.write(1, b"\x02")                           # enable THRI: fires at once, transmitter empty
    assert irqs == [1]
    assert s.read(2, 1)[0] & 0x0F == 0x02
    assert s.read(2, 1)[0] & 0x0F == 0x01         # acknowledged by the IIR read
    s.write(0, b"x")
    assert irqs == [1, 1]


def test_serial_input():
    irqs = []
    s = Serial(Out(), irq=lambda: irqs.append(1))
    s.enqueue_input(b"ab")
    assert irqs == []                             # receive interrupt not enabled yet
    assert s.read(5, 1)[0] & 1 == 1
    s.write(1, b"\x01")
    assert irqs == [1]
    assert s.read(2, 1)[0] & 0x0F == 0x04
    assert s.read(0, 1) == b"a" and s.read(0, 1) == b"b"
    assert s.read(5, 1)[0] & 1 == 0
    assert s.read(0, 1) == b"\0"                 # nothing more: no byte counted as delivered
    assert s.input_counters() == {"rx_queued": 2, "rx_delivered": 2, "rx_dropped": 0}


def test_i8042_reset_line():
    resets = []
    kbd = I8042(lambda: resets.append(1))
    assert kbd.read(4, 1) == b"\x00"              # input buffer empty: kb_wait() passes
    kbd.write(4, b"\xd0")
    assert kbd.read(4, 1) == b"\x01" and kbd.read(0, 1) == b"\x01"
    kbd.write(0, b"\xfe")                         # the data port is not the command port
    assert resets == []
    kbd.write(4, b"\xfe")
    assert resets == [1]


def test_bus_dispatch_and_unclaimed():
    b = Bus("pio")
    s = Serial(Out())
    b.insert(0x3F8, 8, s, "com1")
    b.write(0x3FF, b"\x42")
    assert b.read(0x3FF, 1) == b"\x42"
    assert b.read(0x80, 2) == b"\xff\xff"         # nobody there: all ones
    assert b.unclaimed_accesses == 1
    assert b.read(0x3FF, 2) == b"\xff\xff"        # straddles the end of the device
    with pytest.raises(BusError, match="overlaps com1"):
        b.insert(0x3F0, 9, s, "other")
    b.insert(0x3F0, 8, s, "below")                # adjacent is fine
