"""A 16550A-compatible UART, enough for Linux's 8250 driver to detect it and use it as a console.

Output bytes go to a callback (the machine's console sink, which shows them, logs them and feeds the
agent-line parser). Input bytes queued with `enqueue_input` are presented through RBR/LSR.DR and the
receive interrupt, so an interactive guest on hardware KVM can read the host terminal.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

# Register offsets (DLAB=0 unless noted).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
IO_SIZE = SCR + 1         # eight consecutive ports; where they go is the VMM's choice (COM1 0x3F8)

LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
IER_RDI = 0x01
IER_THRI = 0x02
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_BITS = 0xC0
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
MSR_DEFAULT = 0xB0        # DCD | DSR | CTS: a cable is plugged in and the peer is ready
INPUT_LIMIT = 64 * 1024   # bytes held for the guest before input is dropped (and logged)


class Serial:
    """COM port state machine; `irq` pulses the interrupt line when an enabled condition arises."""

    def __init__(self, output: Callable[[bytes], None], irq: Callable[[], None] | None = None):
        self._output = output
        self._irq = irq or (lambda: None)
        self._lock = threading.Lock()
        self._input: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03          # 8N1
        self.mcr = 0x08          # OUT2
        self.scr = 0
        self.dll = 0x0C          # 9600 baud, the reset value Linux expects to read back
        self.dlm = 0
        self.fifo = False
        self.thr_pending = False  # THR-empty interrupt waiting to be read from IIR
        self._dropped = 0
        self._log = LogThrottle(logger)
        self.rx_queued = 0        # host bytes accepted for the guest
        self.rx_delivered = 0     # ... of which the guest's driver read through RBR

    # BusDevice ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            raise_irq, out = self._write(offset, data[0])
        # The console sink runs outside the lock: it may call back into the VMM (a test's
        # on_line asking the control socket for stats reads input_counters()).
        if out:
            self._output(out)
        if raise_irq:
            self._irq()

    # Host side ---------------------------------------------------------------------------
    def input_counters(self) -> dict[str, int]:
        """Console input: bytes queued from the host, read by the guest, dropped (buffer full)."""
        with self._lock:
            return {"rx_queued": self.rx_queued, "rx_delivered": self.rx_delivered,
                    "rx_dropped": self._dropped}

    def enqueue_input(self, data: bytes) -> None:
        """Queue bytes typed on the host; they reach the guest through RBR."""
        with self._lock:
            room = INPUT_LIMIT - len(self._input)
            if len(data) > room:
                self._log.once("input-full", logging.WARNING,
                               "serial input buffer full: dropping input the guest does not read")
                self._dropped += len(data) - room
                data = data[:room]
            self._input.extend(data)
            self.rx_queued += len(data)
            raise_irq = bool(data) and bool(self.ier & IER_RDI)
        if raise_irq:
            self._irq()

    # Registers ---------------------------------------------------------------------------
    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            if self.mcr & MCR_LOOP or not self._input:
                return 0
            self.rx_delivered += 1
            return self._input.popleft()
        if offset == IER_DLM:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            return self._iir()
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT
            if self._input and not self.mcr & MCR_LOOP:
                lsr |= LSR_DR
            return lsr
        if offset == MSR:
            return self._msr()
        if offset == SCR:
            return self.scr
        return 0xFF

    def _iir(self) -> int:
        fifo = IIR_FIFO_BITS if self.fifo else 0
        if self.ier & IER_RDI and self._input:
            return fifo | IIR_RDI
        if self.ier & IER_THRI and self.thr_pending:
            self.thr_pending = False        # reading IIR acknowledges THR-empty
            return fifo | IIR_THRI
        return fifo | IIR_NO_INT

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            # Loopback: the modem outputs feed the modem inputs (Linux's autoconfig checks this).
            m = self.mcr
            return (((m >> 1) & 1) << 4) | ((m & 1) << 5) | (((m >> 2) & 1) << 6) | (((m >> 3) & 1) << 7)
        return MSR_DEFAULT

    def _write(self, offset: int, value: int) -> tuple[bool, bytes]:
        """Apply a register write; returns (raise the interrupt, bytes to send to the console)."""
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return False, b""
            if self.mcr & MCR_LOOP:
                if len(self._input) < INPUT_LIMIT:
                    self._input.append(value)
                out = b""
            else:
                out = bytes([value])
            self.thr_pending = True
            return bool(self.ier & IER_THRI), out
        if offset == IER_DLM:
            if dlab:
                self.dlm = value
                return False, b""
            was = self.ier
            self.ier = value & 0x0F
            # Enabling THRI while the transmitter is empty raises the interrupt at once (16550A).
            if self.ier & IER_THRI and not was & IER_THRI:
                self.thr_pending = True
                return True, b""
            return bool(self.ier & IER_RDI and self._input and not was & IER_RDI), b""
        if offset == IIR_FCR:
            self.fifo = bool(value & FCR_ENABLE_FIFO)
            if value & FCR_CLEAR_RCVR:
                self._input.clear()
            return False, b""
        if offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        return False, b""
