"""Load an ELF64 x86_64 ``vmlinux`` into guest memory (no decompression, fastest boot).

Each PT_LOAD segment is copied to its physical address (``p_paddr``) and its BSS tail zeroed.
The file is untrusted input: every header field is validated before anything is written, and a
segment must lie inside guest RAM above 1 MiB (below that live the zero page, page tables and
command line we write ourselves).
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from .. import layout
from ..memory import GuestMemory
from .errors import BootError

logger = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
ET_DYN = 3
EM_X86_64 = 62
PT_LOAD = 1

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")      # Elf64_Ehdr (64 bytes)
PHDR = struct.Struct("<IIQQQQQQ")              # Elf64_Phdr (56 bytes)
MAX_PHNUM = 256


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfKernel:
    entry: int              # guest-physical entry point
    start: int              # lowest loaded guest-physical address
    end: int                # one past the highest loaded address
    segments: tuple[Segment, ...]


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def parse(f: BinaryIO, file_size: int) -> tuple[int, list[Segment]]:
    """Validate the ELF header and program headers; returns (e_entry, PT_LOAD segments)."""
    f.seek(0)
    raw = f.read(EHDR.size)
    if len(raw) < 4 or raw[:4] != ELF_MAGIC:
        raise BootError("not an ELF file (bad magic)")
    if len(raw) < EHDR.size:
        raise BootError("truncated ELF header")
    (ident, e_type, e_machine, e_version, e_entry, e_phoff, _shoff, _flags, e_ehsize,
     e_phentsize, e_phnum, *_rest) = EHDR.unpack(raw)
    if ident[4] != ELFCLASS64:
        raise BootError(f"ELF class {ident[4]} is not ELFCLASS64: a 64-bit vmlinux is required")
    if ident[5] != ELFDATA2LSB:
        raise BootError("ELF is not little-endian")
    if e_machine != EM_X86_64:
        raise BootError(f"ELF machine {e_machine} is not x86_64 ({EM_X86_64})")
    if e_type not in (ET_EXEC, ET_DYN):
        raise BootError(f"ELF type {e_type} is not an executable")
    if e_version != EV_CURRENT or e_ehsize < EHDR.size:
        raise BootError("unsupported ELF version or header size")
    if e_phentsize != PHDR.size:
        raise BootError(f"ELF program header size {e_phentsize} != {PHDR.size}")
    if not 0 < e_phnum <= MAX_PHNUM:
        raise BootError(f"ELF has {e_phnum} program headers")
    if e_phoff < EHDR.size or e_phoff + e_phnum * PHDR.size > file_size:
        raise BootError("ELF program headers lie outside the file")
    f.seek(e_phoff)
    table = f.read(e_phnum * PHDR.size)
    if len(table) != e_phnum * PHDR.size:
        raise BootError("truncated ELF program headers")
    segments = []
    for i in range(e_phnum):
        p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = \
            PHDR.unpack_from(table, i * PHDR.size)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise BootError(f"ELF segment {i}: p_filesz {p_filesz:#x} > p_memsz {p_memsz:#x}")
        if p_offset + p_filesz > file_size:
            raise BootError(f"ELF segment {i}: file range [{p_offset:#x}, "
                            f"{p_offset + p_filesz:#x}) beyond the file ({file_size:#x} bytes)")
        segments.append(Segment(p_offset, p_vaddr, p_paddr, p_filesz, p_memsz))
    if not segments:
        raise BootError("ELF has no PT_LOAD segments")
    return e_entry, segments


def _entry_physical(e_entry: int, segments: list[Segment]) -> int:
    """vmlinux's e_entry is physical (phys_startup_64); accept a virtual one inside a segment."""
    for s in segments:
        if s.paddr <= e_entry < s.paddr + s.memsz:
            return e_entry
    for s in segments:
        if s.vaddr <= e_entry < s.vaddr + s.memsz:
            return e_entry - s.vaddr + s.paddr
    raise BootError(f"ELF entry point {e_entry:#x} is not inside any loaded segment")


def _read_into(f: io.BufferedIOBase, view: memoryview, offset: int) -> None:
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise BootError("kernel file shrank while loading")
        done += n


_ZEROS = bytes(1 << 20)


def _zero(view: memoryview) -> None:
    """Zero a (possibly large) BSS without allocating its size in one go."""
    for off in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - off)
        view[off:off + n] = _ZEROS[:n] if n < len(_ZEROS) else _ZEROS


def load(memory: GuestMemory, path: str | os.PathLike) -> ElfKernel:
    """Copy the PT_LOAD segments of ELF ``path`` into ``memory``; returns the entry and extent."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        e_entry, segments = parse(f, file_size)
        for i, s in enumerate(segments):
            if s.paddr < layout.HIGH_MEMORY_START:
                raise BootError(f"ELF segment {i} at {s.paddr:#x} is below 1 MiB "
                                "(reserved for boot structures)")
            if not memory.contains(s.paddr, s.memsz):
                raise BootError(
                    f"ELF segment {i} [{s.paddr:#x}, {s.paddr + s.memsz:#x}) does not fit in guest "
                    f"RAM ({memory.size >> 20} MiB); give the VM more memory")
        ordered = sorted(segments, key=lambda s: s.paddr)
        for a, b in zip(ordered, ordered[1:]):
            if a.paddr + a.memsz > b.paddr:
                raise BootError(f"ELF segments at {a.paddr:#x} and {b.paddr:#x} overlap")
        entry = _entry_physical(e_entry, segments)
        for s in segments:
            view = memory.view(s.paddr, s.memsz)
            _read_into(f, view[:s.filesz], s.offset)
            _zero(view[s.filesz:])
            view.release()
    start = ordered[0].paddr
    end = max(s.paddr + s.memsz for s in segments)
    logger.debug("ELF kernel: %d segments [%#x, %#x), entry %#x", len(segments), start, end, entry)
    return ElfKernel(entry, start, end, tuple(segments))
