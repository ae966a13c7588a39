"""The virtio-fs queue worker: one thread that serves every queue of one device, plus a small pool
for the requests that may block.

It sleeps in epoll on the queue eventfds (KVM ioeventfds, so a guest kick wakes it without any vCPU
thread) and on a stop eventfd. On a kick it drains that queue: pop a chain, let the FUSE server
handle it through a Reader/Writer over guest memory, put it on the used ring, and raise one
interrupt per drained batch if the driver asked for one (EVENT_IDX aware).

Several requests in flight (issue 9 item 4): a guest with several threads keeps many requests
outstanding on its one request queue (Linux uses only the first), and one that waits on the
disk -- an FSYNC of a big dirty file, a large READ or WRITE, a FALLOCATE -- would hold up every
LOOKUP queued behind it. Those (`blocking_request`) go to a few pool threads, which reply and
raise the interrupt themselves; everything else is served inline, since under the GIL a thread
hand-off costs more CPU than a name lookup does (the wake-up, and the GIL passed between two
threads). The used ring and the interrupt decision are shared, so they are updated under
``_ring_lock``; completions may then reach the ring out of order, which virtio and FUSE allow
(the unique in each reply pairs it with its request).

The guest is hostile and the server may have bugs: a bad chain or a failing request is logged
(rate-limited per kind, by a throttle the device keeps across resets, so re-activating the device
does not restart the count) and returned to the guest with 0 bytes; nothing a guest sends can end
this thread. Only a corrupt ring (QueueBroken) stops service on that queue, with DEVICE_NEEDS_RESET
reported.

Stopping is bounded: ``stop(timeout)`` waits at most that long for the requests in progress. A
request that does not return (a host file system call that blocks, or a bug) leaves its thread
behind; ``stop`` then says which request it is stuck in, and the thread, if it ever finishes,
never touches the rings again (the transport released them when the device was reset). Requests
handed to the pool but not started when the device stops are never answered: the driver reset
the device, its rings are gone.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
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
_OPCODE = struct.Struct("<4xI")
_U32 = struct.Struct("<I")
#: Requests served by the pool whatever their size: each may wait on the disk for long.
_ALWAYS_BLOCKING = frozenset(int(op) for op in (
    abi.Opcode.FSYNC, abi.Opcode.FSYNCDIR, abi.Opcode.SYNCFS, abi.Opcode.FALLOCATE,
    abi.Opcode.COPY_FILE_RANGE))
#: READ and WRITE go to the pool from this size on (fuse_read_in/fuse_write_in.size, at the same
#: offset in both): the guest's usual 128 KiB requests stay inline, where they cost less CPU.
_BLOCKING_IO = frozenset((int(abi.Opcode.READ), int(abi.Opcode.WRITE)))
BLOCKING_IO_SIZE = 256 << 10
_IO_SIZE_AT = abi.IN_HEADER.size + 16
#: Pool threads per device: how many blocking requests run at once.
BLOCKING_THREADS = 2
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


def blocking_request(chain: DescriptorChain) -> bool:
    """Whether the request may block for long enough to hold up the requests behind it (see the
    module docstring). Looks only at the in-header's opcode and, for READ/WRITE, the size; a
    chain too short for them is not blocking (the server rejects it inline)."""
    readable = chain.readable
    if not readable or len(readable[0]) < _OPCODE.size:
        return False
    opcode = _OPCODE.unpack_from(readable[0])[0]
    if opcode in _ALWAYS_BLOCKING:
        return True
    if opcode not in _BLOCKING_IO:
        return False
    size = _peek(readable, _IO_SIZE_AT, _U32)
    return size is not None and size >= BLOCKING_IO_SIZE


def _peek(views: list[memoryview], pos: int, layout: struct.Struct) -> int | None:
    """The value of ``layout`` at byte ``pos`` of the concatenated views, if it lies inside one."""
    for v in views:
        n = len(v)
        if pos < n:
            if pos + layout.size > n:
                return None
            return layout.unpack_from(v, pos)[0]
        pos -= n
    return None


@dataclass
class WorkerCounters:
    """Transport-level counters (written by the worker thread only; read by anyone)."""

    chains: int = 0  # descriptor chains returned to the guest, invalid ones included
    invalid_chains: int = 0  # malformed chains returned with 0 bytes
    handler_errors: int = 0  # requests whose handling raised (returned with 0 bytes)
    interrupts: int = 0  # used-buffer interrupts raised
    notifications: int = 0  # queue kicks seen (wakeups on a queue eventfd)
    broken_queues: int = 0  # queues stopped because the ring itself was corrupt
    pooled: int = 0  # requests handed to the blocking pool

    def snapshot(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


class FsWorker:
    """Owns the worker thread, its epoll fd and its stop eventfd (not the queue eventfds)."""

    def __init__(self, name: str, server, interrupt: VirtioInterrupt, queues: list[Queue | None],
                 queue_events: list[int], counters: WorkerCounters,
                 log: LogThrottle | None = None, os_name: str | None = None,
                 blocking_threads: int = BLOCKING_THREADS) -> None:
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
        # The request the queue thread is serving (queue, chain, start time), for stop()'s
        # diagnosis; the pool's are in _in_pool (by thread).
        self._current: tuple[int, DescriptorChain, float] | None = None
        self._in_pool: dict[int, tuple[int, DescriptorChain, float]] = {}
        self._os_name = os_name
        self._should_stop = self.stop_requested  # one bound method, not one per request
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # Used rings, their interrupt decisions and the counters, shared with the pool.
        self._ring_lock = threading.Lock()
        # The pool's threads start on demand (most sessions never send a blocking request), up
        # to blocking_threads; their Python names keep them apart from the queue thread.
        self._pool_queue: queue_mod.SimpleQueue[tuple[int, DescriptorChain] | None] = \
            queue_mod.SimpleQueue()
        self._pool: list[threading.Thread] = []
        self._pool_max = blocking_threads
        self._pool_idle = 0  # pool threads waiting for work (under _ring_lock)

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

    def _to_pool(self, i: int, chain: DescriptorChain) -> None:
        """Queue a blocking request for the pool, starting a pool thread if none is idle."""
        with self._ring_lock:
            grow = self._pool_idle == 0 and len(self._pool) < self._pool_max
            self.counters.pooled += 1
        if grow:
            t = threading.Thread(target=self._pool_run, daemon=True,
                                 name=f"virtio-fs-pool:{self._thread.name}/{len(self._pool)}")
            self._pool.append(t)
            t.start()
        self._pool_queue.put((i, chain))


    def stop(self, timeout: float | None = None) -> bool:
        """Ask the threads to stop after the requests in progress and wait up to ``timeout``
        seconds in all (None: forever). True once they have stopped and the fds are released;
        False if one is stuck in a request (``stuck_in()`` says which): call stop() again later
        to collect it."""
        if self._stop_fd < 0:
            return True
        if not self._stopping:
            self._stopping = True
            os.eventfd_write(self._stop_fd, 1)
        # The queue thread first: once it is gone, no pool thread can be added.
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._join(self._thread, deadline):
            return False
        for _ in self._pool:
            self._pool_queue.put(None)
        for t in self._pool:
            if not self._join(t, deadline):
                return False
        os.close(self._stop_fd)
        self._stop_fd = -1
        return True

    @staticmethod
    def _join(t: threading.Thread, deadline: float | None) -> bool:
        """Wait for ``t`` until ``deadline`` (monotonic; None: forever); whether it has ended."""
        if t is threading.current_thread() or t.ident is None:
            return True
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not t.is_alive()

    def stuck_in(self) -> str:
        """A request in progress, e.g. "LSEEK unique=12 on queue 1 for 2.0 s" ('' if none)."""
        current = self._current
        if current is None:
            current = next(iter(list(self._in_pool.values())), None)
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
        """Drain queue i (blocking requests to the pool), then raise at most one interrupt for
        what this thread returned."""
        q = self.queues[i]
        if q is None or i in self._broken:
            return
        counters = self.counters
        ring_lock = self._ring_lock
        returned = 0
        while not self._stopping:
            try:
                chain = q.pop()
            except InvalidChain as e:
                self._log.sample("invalid:" + re.sub(r"\d+", "N", e.reason), logging.WARNING,
                                 "virtio-fs queue %d: %s; returning it with 0 bytes", i, e)
                with ring_lock:
                    counters.invalid_chains += 1
                    counters.chains += 1
                    q.add_used(e.head, 0)
                returned += 1
                continue
            except QueueBroken as e:
                self._log.sample("broken", logging.ERROR,
                                 "virtio-fs queue %d: %s; queue stopped, device needs reset", i, e)
                self._broken.add(i)
                counters.broken_queues += 1
                self.interrupt.signal_needs_reset()
                break
            if chain is None:
                break
            if self._pool_max and blocking_request(chain):
                self._to_pool(i, chain)
                continue
            self._current = (i, chain, time.monotonic())
            written = self._handle(i, chain)
            self._current = None
            if self._stopping:
                return  # the device is being reset: its rings belong to nobody now
            with ring_lock:
                q.add_used(chain.head, written)
                counters.chains += 1
            returned += 1
        if returned:
            self._notify(i, q)

    def _notify(self, i: int, q: Queue) -> None:
        """Interrupt the driver if it wants to hear of the used entries added so far."""
        with self._ring_lock:
            if self._stopping or not q.needs_notification():
                return
            self.counters.interrupts += 1
        self.interrupt.signal_used_queue(i)

    def _pool_run(self) -> None:
        """A pool thread: serve blocking requests one at a time, each replied to on its own."""
        if self._os_name:
            set_os_thread_name(self._os_name)  # the same name: CPU figures sum the device's threads
        me = threading.get_ident()
        try:
            while True:
                with self._ring_lock:
                    self._pool_idle += 1
                item = self._pool_queue.get()
                with self._ring_lock:
                    self._pool_idle -= 1
                if item is None or self._stopping:
                    return
                i, chain = item
                self._in_pool[me] = (i, chain, time.monotonic())
                try:
                    written = self._handle(i, chain)
                finally:
                    del self._in_pool[me]
                q = self.queues[i]
                assert q is not None  # only popped chains get here
                with self._ring_lock:
                    if self._stopping:
                        return
                    q.add_used(chain.head, written)
                    self.counters.chains += 1
                self._notify(i, q)
        except Exception:  # a bug here must be visible, but must not take the process down
            if not self._stopping:
                logger.exception("virtio-fs worker %s: pool thread stopped by an internal error",
                                 self._thread.name)

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
