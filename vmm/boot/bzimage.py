"""Load a bzImage (Linux x86 boot protocol >= 2.12) for a 64-bit direct entry.

The file is the real-mode setup (``(setup_sects + 1) * 512`` bytes, containing the setup header at
0x1F1) followed by the protected-mode kernel (the decompressor).  We skip the real-mode part and
copy the protected-mode part to its load address; the 64-bit entry (``startup_64``) is at load
address + 0x200 (boot.rst, "64-bit BOOT PROTOCOL").  The caller copies the setup header into the
zero page.  Everything read from the image is validated: it is untrusted input.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from .. import layout
from ..memory import GuestMemory
from .bootparams import BOOT_FLAG_MAGIC, FIELDS, HDRS_MAGIC, LOADED_HIGH, XLF_KERNEL_64
from .errors import BootError

logger = logging.getLogger(__name__)

MIN_VERSION = 0x020C           # 2.12: xloadflags / XLF_KERNEL_64 exist
SETUP_AREA = 0x8000            # setup header + real-mode code the caller wants: first 32 KiB max
ENTRY_64_OFFSET = 0x200


@dataclass(frozen=True)
class BzImage:
    entry: int                 # guest-physical 64-bit entry point
    load_addr: int             # where the protected-mode code was copied
    end: int                   # end of the region the kernel may use (load + max(size, init_size))
    setup: bytes               # the real-mode part (holds the setup header at 0x1F1)
    version: int
    initrd_addr_max: int
    cmdline_max: int           # maximum command line length without the NUL


def is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x206 and head[0x202:0x206] == b"HdrS"


def _hdr(setup: bytes, name: str) -> int:
    off, fmt = FIELDS[f"hdr.{name}"]
    return struct.unpack_from(fmt, setup, off)[0]


def parse_header(setup: bytes, file_size: int) -> dict[str, int]:
    """Check the setup header; returns the fields the loader uses."""
    if len(setup) < 0x270 or file_size < 0x270:
        raise BootError("file too small to be a bzImage")
    if _hdr(setup, "header") != HDRS_MAGIC:
        raise BootError("no 'HdrS' setup header at 0x202: not a bzImage")
    if _hdr(setup, "boot_flag") != BOOT_FLAG_MAGIC:
        raise BootError(f"bzImage boot_flag {_hdr(setup, 'boot_flag'):#x} != 0xaa55")
    version = _hdr(setup, "version")
    if version < MIN_VERSION:
        raise BootError(f"boot protocol {version >> 8}.{version & 0xFF} is too old "
                        f"(need >= 2.{MIN_VERSION & 0xFF} for 64-bit entry)")
    if not _hdr(setup, "loadflags") & LOADED_HIGH:
        raise BootError("bzImage is not LOADED_HIGH (zImage kernels are not supported)")
    if not _hdr(setup, "xloadflags") & XLF_KERNEL_64:
        raise BootError("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")
    setup_sects = _hdr(setup, "setup_sects") or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= file_size:
        raise BootError(f"setup size {setup_size:#x} leaves no protected-mode kernel in the file")
    return {
        "version": version,
        "setup_size": setup_size,
        "relocatable": _hdr(setup, "relocatable_kernel"),
        "code32_start": _hdr(setup, "code32_start"),
        "pref_address": _hdr(setup, "pref_address"),
        "kernel_alignment": _hdr(setup, "kernel_alignment"),
        "init_size": _hdr(setup, "init_size"),
        "initrd_addr_max": _hdr(setup, "initrd_addr_max"),
        "cmdline_size": _hdr(setup, "cmdline_size"),
    }


def load(memory: GuestMemory, path: str | os.PathLike) -> BzImage:
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(SETUP_AREA)
        h = parse_header(head, file_size)
        setup_size = h["setup_size"]
        pm_size = file_size - setup_size
        # A relocatable kernel runs where it is put; loading it at its preferred address (16 MiB)
        # avoids the self-relocation.  Otherwise code32_start is where it expects to be.
        if h["relocatable"] and h["pref_address"]:
            load_addr = h["pref_address"]
        else:
            load_addr = h["code32_start"] or layout.BZIMAGE_DEFAULT_LOAD
        if load_addr < layout.HIGH_MEMORY_START:
            raise BootError(f"bzImage load address {load_addr:#x} is below 1 MiB")
        span = max(pm_size, h["init_size"])
        if not memory.contains(load_addr, span):
            raise BootError(
                f"bzImage needs guest RAM [{load_addr:#x}, {load_addr + span:#x}) (init_size "
                f"{h['init_size']:#x}) but the VM has {memory.size >> 20} MiB")
        view = memory.view(load_addr, pm_size)
        f.seek(setup_size)
        done = 0
        while done < pm_size:
            n = f.readinto(view[done:])
            if not n:
                raise BootError("kernel file shrank while loading")
            done += n
        view.release()
    setup = head[:min(len(head), setup_size)]
    logger.debug("bzImage protocol %#x: %#x bytes at %#x, init_size %#x", h["version"], pm_size,
                 load_addr, h["init_size"])
    return BzImage(
        entry=load_addr + ENTRY_64_OFFSET, load_addr=load_addr, end=load_addr + span,
        setup=setup, version=h["version"],
        initrd_addr_max=h["initrd_addr_max"] or 0x37FFFFFF,
        cmdline_max=h["cmdline_size"] if h["version"] >= 0x0206 else 255,
    )
