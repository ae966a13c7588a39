"""Put a Linux kernel, its command line, initrd and boot structures into guest memory.

``load_kernel`` detects an ELF ``vmlinux`` (preferred: no in-guest decompression) or a bzImage,
loads it, and writes everything the 64-bit entry point expects: identity page tables, GDT/IDT,
the command line and the zero page.  The vCPU side (registers) is in ``vmm.boot.cpu``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .. import layout
from ..memory import GuestMemory
from . import bzimage, elf, paging
from .bootparams import build_zero_page
from .errors import BootError

logger = logging.getLogger(__name__)

__all__ = ["BootError", "BootInfo", "load_kernel", "place_initrd"]

PAGE = 0x1000
ELF_INITRD_ADDR_MAX = 0x7FFFFFFF       # what a 6.1 x86_64 kernel advertises in its header


@dataclass(frozen=True)
class BootInfo:
    entry: int                 # guest-physical RIP for the boot vCPU
    boot_params_addr: int      # zero page (RSI at entry)
    kind: str                  # "elf" | "bzimage"
    kernel_start: int = 0
    kernel_end: int = 0
    cmdline_addr: int = layout.CMDLINE_ADDR
    initrd_addr: int | None = None
    initrd_size: int = 0


def place_initrd(memory: GuestMemory, size: int, kernel_end: int, addr_max: int) -> int:
    """Highest page-aligned address for ``size`` bytes of initrd: in low RAM, above the kernel,
    with its last byte <= ``addr_max`` (boot.rst: initrd_addr_max)."""
    top = min(memory.low_ram_end, addr_max + 1)
    addr = (top - size) & ~(PAGE - 1)
    if size <= 0 or addr < kernel_end or addr < layout.HIGH_MEMORY_START:
        raise BootError(
            f"initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and "
            f"{top:#x}; give the VM more memory or use a smaller initrd")
    return addr


def _encode_cmdline(cmdline: str, limit: int) -> bytes:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL byte")
    if len(raw) > limit:
        raise BootError(f"kernel command line is {len(raw)} bytes; the limit is {limit}")
    return raw + b"\0"


def load_kernel(memory: GuestMemory, kernel_path: str | os.PathLike, cmdline: str, initrd: bytes | None,
                acpi_rsdp: int | None = None) -> BootInfo:
    """Load ``kernel_path`` (ELF vmlinux or bzImage) and the boot structures into ``memory``."""
    path = Path(kernel_path)
    try:
        with open(path, "rb") as f:
            head = f.read(0x1000)
    except FileNotFoundError:
        raise BootError(f"kernel image not found: {path}") from None
    except IsADirectoryError:
        raise BootError(f"kernel image is a directory: {path}") from None
    except OSError as e:
        raise BootError(f"cannot read kernel image {path}: {e.strerror}") from e
    if memory.size < layout.HIGH_MEMORY_START * 2:
        raise BootError(f"guest RAM of {memory.size} bytes is too small to boot Linux")

    setup_header: bytes | None = None
    cmdline_limit = layout.CMDLINE_MAX_SIZE - 1
    if elf.is_elf(head):
        k = elf.load(memory, path)
        kind, entry, start, end = "elf", k.entry, k.start, k.end
        initrd_max = ELF_INITRD_ADDR_MAX
    elif bzimage.is_bzimage(head):
        b = bzimage.load(memory, path)
        kind, entry, start, end = "bzimage", b.entry, b.load_addr, b.end
        initrd_max = b.initrd_addr_max
        setup_header = b.setup
        cmdline_limit = min(cmdline_limit, b.cmdline_max)
    else:
        raise BootError(f"{path} is neither an ELF vmlinux nor a bzImage "
                        f"(starts with {head[:4].hex() or 'nothing: empty file'})")

    raw_cmdline = _encode_cmdline(cmdline, cmdline_limit)
    memory.write(layout.CMDLINE_ADDR, raw_cmdline)

    initrd_range = None
    if initrd:
        addr = place_initrd(memory, len(initrd), end, initrd_max)
        memory.write(addr, initrd)
        initrd_range = (addr, len(initrd))

    zp = build_zero_page(ram_ranges=memory.ram_ranges(), cmdline_addr=layout.CMDLINE_ADDR,
                         cmdline_size=len(raw_cmdline) - 1, setup_header=setup_header,
                         initrd=initrd_range, acpi_rsdp=acpi_rsdp)
    memory.write(layout.ZERO_PAGE_ADDR, zp.to_bytes())
    paging.write_boot_tables(memory)
    logger.info("loaded %s kernel %s: [%#x, %#x) entry %#x%s", kind, path.name, start, end, entry,
                f", initrd {initrd_range[1]} bytes at {initrd_range[0]:#x}" if initrd_range else "")
    return BootInfo(entry=entry, boot_params_addr=layout.ZERO_PAGE_ADDR, kind=kind,
                    kernel_start=start, kernel_end=end, cmdline_addr=layout.CMDLINE_ADDR,
                    initrd_addr=initrd_range[0] if initrd_range else None,
                    initrd_size=len(initrd) if initrd else 0)
