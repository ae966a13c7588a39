"""Long host calls split into chunks, so that a device reset or stop never waits long for the worker.

One request may ask the host for a lot of work: a 512 MiB FALLOCATE on tmpfs takes about 0.25 s, a
512 MiB COPY_FILE_RANGE on ext4 two seconds, a 1 MiB READ from a cold disk some milliseconds. The
worker serves requests one at a time, and a device reset (a vCPU writing Status=0) waits for the
request in progress; so such calls are made piece by piece, and between two pieces the request's
``should_stop`` (``fuse.filesystem.Context``, set by the transport) is asked whether the device is
being stopped. Pieces are sized by time, not bytes: each starts from a size that suits the call and
doubles while a piece takes under half of :data:`TARGET_S`, halves when one takes longer, so a fast
file system is not slowed by small pieces and a slow one still answers a stop within a few
:data:`TARGET_S`.

What a stopped call reports is the caller's decision (passthrough.py): a short count where the
protocol allows one (WRITE, COPY_FILE_RANGE), EINTR otherwise (READ, FALLOCATE). A stop only comes
with a device reset or the end of the process, whose reply the guest never receives.

fsync and syncfs cannot be split: they take as long as the host's storage needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

#: Seconds one piece should take: a tenth of the 50 ms a reset may wait for the worker.
TARGET_S = 0.005

KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class Pieces:
    """How one kind of call is split: the first piece, and the bounds adaptation keeps to."""

    first: int
    smallest: int
    largest: int


#: READ/WRITE between guest memory and a file (at most max_write, 1 MiB, per request).
IO = Pieces(first=256 * KiB, smallest=64 * KiB, largest=1 * MiB)
#: COPY_FILE_RANGE between two host files.
COPY = Pieces(first=1 * MiB, smallest=256 * KiB, largest=64 * MiB)
#: FALLOCATE (allocation, punching, zeroing): cheap per byte on extent file systems, and free
#: where there is nothing to do (a hole punched beyond the end of the file). No upper bound: a
#: guest may ask for 2**63 bytes, and pieces that cost nothing must double until they cover it
#: (about 60 pieces) instead of taking billions of 1 GiB steps. A piece that does real work
#: takes the time the whole call would have, bounded by the file system's free space (ENOSPC),
#: and the next one halves.
ALLOCATE = Pieces(first=4 * MiB, smallest=1 * MiB, largest=1 << 62)


def never() -> bool:
    return False


def run(total: int, step: Callable[[int, int], int], should_stop: Callable[[], bool],
        pieces: Pieces) -> tuple[int, bool]:
    """Do ``total`` bytes of work as ``step(done, size)`` calls, each returning the bytes it
    did (0: nothing more to do, e.g. end of file). Between calls, ``should_stop()`` ends the
    loop early. Returns ``(bytes done, stopped)``; stopped is True only when work was left."""
    done = 0
    size = pieces.first
    while done < total:
        if done and should_stop():
            return done, True
        want = min(size, total - done)
        t0 = time.monotonic()
        n = step(done, want)
        took = time.monotonic() - t0
        if n <= 0:
            break
        done += n
        if took < TARGET_S / 2:
            size = min(size * 2, pieces.largest)
        elif took > TARGET_S:
            size = max(size // 2, pieces.smallest)
    return done, False
