"""The virtio-fs queue worker: one thread that serves every queue of one device.

It sleeps in epoll on the queue eventfds (KVM ioeventfds, so a guest kick wakes it without any vCPU
thread) and on a stop eventfd. On a kick it drains that queue: pop a chain, let the FUSE server
handle it through a Reader/Writer over guest memory, put it on the used ring, and raise one
interrupt per drained batch if the driver asked for one (EVENT_IDX aware).

The guest is hostile and the server may have bugs: a bad chain or a failing request is logged
(rate-limited per kind, by a throttle the device keeps across resets, so re-activating the device
does not restart the count) and returned to the guest with 0 bytes; nothing a guest sends can end
this thread. Only a corrupt ring (QueueBroken) stops service on that queue, with DEVICE_NEEDS_RESET
reported.

Stopping is bounded: ``stop(timeout)`` waits at most that long for the request in progress. A
request that does not return (a host file system call that blocks, or a bug) leaves the thread
behind; ``stop`` then says which request it is stuck in, and the thread, if it ever finishes,
never touches the rings again (the transport released them when the device was reset).
"""

from __future__ import annotations

import logging
import os
import re
import select
import struct
import threading
import time
from dataclasses import asdict, dataclass

from devices.virtio.chain import ChainReader, ChainWriter
from devices.virtio.interrupt import VirtioInterrupt
from devices.virtio.queue import DescriptorChain, InvalidChain, Queue, QueueBroken
from fuse import abi
from fuse.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

_OPCODE_UNIQUE = struct.Struct("<4xIQ")  # fuse_in_header: len, opcode, unique
_PR_SET_NAME = 15
_TASK_COMM_LEN = 16  # the kernel keeps 15 bytes of a thread name, plus the NUL


def os_thread_name(tag: str) -> str:
    """The OS name of a device's worker thread (what /proc/PID/task/TID/comm shows), so tools
    and benchmarks can find the thread and read its CPU time: `pyvmm-fs-TAG`, cut to 15 bytes."""
    return f"pyvmm-fs-{tag}".encode()[:_TASK_COMM_LEN - 1].decode("utf-8", "ignore")


def set_os_thread_name(name: str) -> None:
    """Name the calling thread for the OS (prctl PR_SET_NAME); best effort."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:_TASK_COMM_LEN - 1]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class WorkerCounters:
    """Transport-level counters (written by the worker thread only; read by anyone)."""

    chains: int = 0  # descriptor chains returned to the guest, invalid ones included
    invalid_chains: int = 0  # malformed chains returned with 0 bytes
    handler_errors: int = 0  # requests whose handling raised (returned with 0 bytes)
    interrupts: int = 0  # used-buffer interrupts raised
    notifications: int = 0  # queue kicks seen (wakeups on a queue eventfd)
    broken_queues: int = 0  # queues stopped because the ring itself was corrupt

    def snapshot(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


class FsWorker:
    """Owns the worker thread, its epoll fd and its stop eventfd (not the queue eventfds)."""

    def __init__(self, name: str, server, interrupt: VirtioInterrupt, queues: list[Queue | None],
                 queue_events: list[int], counters: WorkerCounters,
                 log: LogThrottle | None = None, os_name: str | None = None) -> None:
        if len(queues) != len(queue_events):
            raise ValueError("one eventfd per queue")
        self.server = server
        self.interrupt = interrupt
        self.queues = queues
        self.queue_events = queue_events
        self.counters = counters
        self._log = log if log is not None else LogThrottle(logger)
        self._stopping = False
        self._broken: set[int] = set()
        # The request being served (queue, chain, start time), for stop()'s diagnosis.
        self._current: tuple[int, DescriptorChain, float] | None = None
        self._os_name = os_name
        self._should_stop = self.stop_requested  # one bound method, not one per request
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def stop_requested(self) -> bool:
        """The ``should_stop`` of every request this worker serves: True once stop() was called,
        so a long request ends between two pieces (devices/virtio/fs/chunks.py) instead of
        keeping a device reset waiting."""
        return self._stopping

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the thread to stop after the request in progress and wait up to ``timeout``
        seconds (None: forever). True once it has stopped and its fds are released; False if it
        is stuck in a request (``stuck_in()`` says which): call stop() again later to collect it."""
        if self._stop_fd < 0:
            return True
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        os.close(self._stop_fd)
        self._stop_fd = -1
        return True

    def stuck_in(self) -> str:
        """The request in progress, e.g. "LSEEK unique=12 on queue 1 for 2.0 s" ('' if none)."""
        current = self._current
        if current is None:
            return ""
        queue, chain, since = current
        what = "a request"
        if chain.readable and len(chain.readable[0]) >= _OPCODE_UNIQUE.size:
            opcode, unique = _OPCODE_UNIQUE.unpack_from(chain.readable[0])
            try:
                name = abi.Opcode(opcode).name
            except ValueError:
                name = f"opcode {opcode}"
            what = f"{name} unique={unique}"
        return f"{what} on queue {queue} for {time.monotonic() - since:.1f} s"

    # -- thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        if self._os_name:
            set_os_thread_name(self._os_name)
        ep = select.epoll()
        try:
            by_fd: dict[int, int] = {}
            for index, (q, fd) in enumerate(zip(self.queues, self.queue_events)):
                if q is not None:
                    ep.register(fd, select.EPOLLIN)
                    by_fd[fd] = index
            ep.register(self._stop_fd, select.EPOLLIN)
            # Kicks that arrived before DRIVER_OK (or before we registered) are not lost.
            for qi in by_fd.values():
                self._process_queue(qi)
            while not self._stopping:
                for fd, _ in ep.poll():
                    if fd == self._stop_fd or self._stopping:
                        return
                    i = by_fd.get(fd)
                    if i is None:
                        continue
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    self.counters.notifications += 1
                    self._process_queue(i)
        except Exception:  # a bug here must be visible, but must not take the process down
            if not self._stopping:  # after a stop the rings may be gone: nothing to report
                logger.exception("virtio-fs worker %s stopped by an internal error",
                                 self._thread.name)
        finally:
            ep.close()

    def _process_queue(self, i: int) -> None:
        """Drain queue i, then raise at most one interrupt for the batch."""
        q = self.queues[i]
        if q is None or i in self._broken:
            return
        returned = 0
        while not self._stopping:
            try:
                chain = q.pop()
            except InvalidChain as e:
                self._log.sample("invalid:" + re.sub(r"\d+", "N", e.reason), logging.WARNING,
                                 "virtio-fs queue %d: %s; returning it with 0 bytes", i, e)
                self.counters.invalid_chains += 1
                self.counters.chains += 1
                q.add_used(e.head, 0)
                returned += 1
                continue
            except QueueBroken as e:
                self._log.sample("broken", logging.ERROR,
                                 "virtio-fs queue %d: %s; queue stopped, device needs reset", i, e)
                self._broken.add(i)
                self.counters.broken_queues += 1
                self.interrupt.signal_needs_reset()
                break
            if chain is None:
                break
            self._current = (i, chain, time.monotonic())
            written = self._handle(i, chain)
            self._current = None
            if self._stopping:
                return  # the device is being reset: its rings belong to nobody now
            q.add_used(chain.head, written)
            self.counters.chains += 1
            returned += 1
        if returned and q.needs_notification():
            self.counters.interrupts += 1
            self.interrupt.signal_used_queue(i)

    def _handle(self, i: int, chain) -> int:
        writer = ChainWriter(chain)
        try:
            n = self.server.handle(ChainReader(chain), writer, queue=i,
                                   should_stop=self._should_stop)
        except Exception as e:  # never let one request end the worker
            self.counters.handler_errors += 1
            self._log.sample(f"handler:{type(e).__name__}", logging.ERROR,
                             "virtio-fs queue %d: request failed (%s: %s); returning it with 0 "
                             "bytes", i, type(e).__name__, e)
            return 0
        if not isinstance(n, int) or n < 0 or n > writer.bytes_written:
            self._log.sample("handler-len", logging.ERROR,
                             "virtio-fs queue %d: server reported %r bytes but wrote %d",
                             i, n, writer.bytes_written)
            return writer.bytes_written
        return n
