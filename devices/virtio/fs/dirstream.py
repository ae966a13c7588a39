"""Directory listings streamed from the directory fd: a READDIR costs the host O(1) memory.

The first version read the whole directory into a list at offset 0 and served offsets as indices
into it, so every open directory handle held every entry of its directory (4.8 MB per handle for
20,000 entries; a guest opening many handles could make the host spend any amount of memory).
Here a handle keeps only its fd, the position the fd stands at, and at most one getdents64 buffer
of records read from the host but not yet sent (``readdir_buffer`` bytes).

Offsets are the host's own ``d_off`` cookies, as in virtiofsd and crosvm: the guest resumes a
listing with the offset of the last entry it received, and that is exactly what the file system
gave us as the position after that entry. Two cases:

* The guest goes on where the handle stands (the usual sequential read): the kept records are
  served first, then getdents64 continues from the fd's own position. No seek happens, so file
  systems whose cookies are positions in a changing list (tmpfs before Linux 6.6, overlayfs merged
  directories) still return every entry that exists throughout exactly once, as they do for a
  local process reading the directory.
* Any other offset (a rewind to 0, a seekdir, a second reader on the handle): the kept records
  are dropped and the fd is lseek'ed to the cookie, with the host file system's seekdir semantics.

The consumer (the FUSE server) stops pulling entries when its reply is full; an entry it pulled
but did not send is not consumed. The iterator learns which one that is from the GeneratorExit
raised at its ``yield`` when the consumer closes it, and keeps that record for the next request.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Generator

from . import syscalls

#: linux_dirent64 header: d_ino, d_off, d_reclen, d_type; then the NUL-terminated name.
_HDR = struct.Struct("<QqHB")


class DirStream:
    """The read position of one open directory handle (see the module docstring).

    One reader at a time is what a guest sends (its VFS serialises readers of an open directory,
    and one worker serves a device). Should two overlap anyway (a hostile client, or a reader
    that is never closed), the later one wins: each call takes a new generation number, and
    only the newest one writes the position back, so nothing worse than that handle's own
    listing is affected.
    """

    __slots__ = ("fd", "bufsize", "_pos", "_pending", "_generation")

    def __init__(self, fd: int, bufsize: int) -> None:
        if bufsize < 1024:
            raise ValueError("a getdents64 buffer needs room for at least one record")
        self.fd = fd
        self.bufsize = bufsize
        #: The cookie the fd stands at in the guest's terms (0: the start; -1: unknown).
        self._pos = 0
        #: Raw records read from the host and not yet handed out, starting at ``_pos``.
        self._pending = b""
        self._generation = 0

    @property
    def pending_bytes(self) -> int:
        """Host memory this handle holds for its listing (for limits and the fuzzer)."""
        return len(self._pending)

    def entries(self, offset: int) -> Generator[tuple[int, int, int, bytes], None, None]:
        """``(d_ino, d_off, d_type, name)`` from ``offset`` (0 or a ``d_off`` handed out before);
        ``d_off`` is where to resume after that entry. Close the iterator when done: an entry
        pulled last and not sent is kept for the next call."""
        self._generation += 1
        me = self._generation
        pending = b""
        if offset == self._pos:
            pending = self._pending
        else:
            self._pos = -1  # unknown until the seek succeeded
            syscalls.lseek(self.fd, offset, os.SEEK_SET)
        self._pending = b""
        self._pos = offset
        buf, i = pending, 0
        try:
            while True:
                if i >= len(buf):
                    buf, i = syscalls.getdents64_raw(self.fd, self.bufsize), 0
                    if not buf:
                        return
                d_ino, d_off, reclen, d_type = _HDR.unpack_from(buf, i)
                if reclen < _HDR.size or i + reclen > len(buf):
                    raise OSError(errno.EIO, "corrupt getdents64 record")
                name = buf[i + _HDR.size:i + reclen].split(b"\0", 1)[0]
                try:
                    yield d_ino, d_off, d_type, name
                except GeneratorExit:
                    if self._generation == me:
                        self._pending = buf[i:]  # pulled, not consumed: the next call starts here
                    raise
                i += reclen
                if self._generation == me:
                    self._pos = d_off
        except GeneratorExit:
            raise
        except BaseException:
            # A failed read leaves the fd's position unknown: the next call seeks.
            if self._generation == me:
                self._pos = -1
                self._pending = b""
            raise
