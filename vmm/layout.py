"""The guest's physical address map and interrupt numbers, in one place.

Every address the VMM, the boot code, the ACPI tables and the devices agree on lives here, so a
change (say, a bigger command line) cannot leave one of them behind.  The values follow what
Firecracker / cloud-hypervisor use for a direct-boot x86_64 Linux guest; comments say why.

Devices never import this module (layers point downward: vmm -> devices): the VMM places them by
passing these addresses in.  What is intrinsic to a device -- how many ports or bytes its registers
span -- is defined by the device and only named here, so the map and the device cannot disagree.
"""

from __future__ import annotations

from devices import acpi_pm, i8042, serial
from devices.virtio import mmio as virtio_mmio
from kvm_sys import bindings as kb

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# ---- low memory (below 1 MiB): boot structures the kernel reads before it has its own --------
# Real-mode IVT and BDA live in [0, 0x500): never put anything there.
GDT_ADDR = 0x500              # boot GDT: null, 64-bit code, data, TSS descriptors (4 x 8 bytes)
GDT_ENTRIES = 4
IDT_ADDR = 0x520              # empty IDT (limit 7): any exception before the kernel's IDT -> triple fault
ZERO_PAGE_ADDR = 0x7000       # struct boot_params ("zero page"); RSI points here at the 64-bit entry
ZERO_PAGE_SIZE = 0x1000       # sizeof(struct boot_params)
BOOT_STACK_POINTER = 0x8FF0   # RSP/RBP at entry: just below the page tables, above the zero page
PML4_ADDR = 0x9000            # identity page tables: PML4 -> PDPT -> (PDs) ...
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000              # first of IDENTITY_MAP_GIB page directories (2 MiB pages), 4 KiB each
IDENTITY_MAP_GIB = 4          # map [0, 4 GiB): kernel, zero page, cmdline, initrd and MMIO all covered
PAGE_TABLES_END = PD_ADDR + IDENTITY_MAP_GIB * 0x1000   # 0xF000: must stay below CMDLINE_ADDR
CMDLINE_ADDR = 0x20000        # kernel command line, NUL-terminated
CMDLINE_MAX_SIZE = 2048       # COMMAND_LINE_SIZE of x86 Linux (includes the NUL)

# [0x9FC00, 0x100000): EBDA, VGA hole and BIOS ROM area on a PC; reserved in the e820 map so the
# kernel never allocates it, and where Linux scans for the RSDP/MP tables.
EBDA_START = 0x9FC00
HIGH_MEMORY_START = 0x100000  # 1 MiB: usual RAM starts again here
ACPI_TABLES_ADDR = 0xE0000    # RSDP (Linux scans 0xE0000-0xFFFFF for "RSD PTR ") then XSDT/FADT/...
ACPI_TABLES_SIZE = 0x20000    # up to 1 MiB; all inside the reserved range above
ACPI_TABLES_END = ACPI_TABLES_ADDR + ACPI_TABLES_SIZE
RSDP_ADDR = ACPI_TABLES_ADDR  # where the RSDP goes: found by the scan even without acpi_rsdp_addr

# ---- the kernel ------------------------------------------------------------------------------
KERNEL_LOAD_ADDR = 0x1000000  # 16 MiB = LOAD_PHYSICAL_ADDR of a default x86_64 kernel
BZIMAGE_DEFAULT_LOAD = 0x100000   # code32_start default for a non-relocatable bzImage
BOOT_LOADER_TYPE = 0xFF       # type_of_loader "undefined" (boot.rst: for loaders without an id)

# ---- 32-bit MMIO hole: no RAM in [3 GiB, 4 GiB) ------------------------------------------------
MMIO_HOLE_START = 3 * GiB     # RAM above this is relocated to HIGH_RAM_START
MMIO_HOLE_END = 4 * GiB
HIGH_RAM_START = MMIO_HOLE_END

# virtio-mmio transports: one register window each (4 KiB, the transport's size), back to back,
# interrupts from GSI 5 up (kernel cmdline "virtio_mmio.device=4K@0xd0000000:5"); 5.. avoids the
# legacy ISA lines in use (1, 4, 8, 12...)
VIRTIO_MMIO_BASE = 0xD0000000
VIRTIO_MMIO_SIZE = virtio_mmio.MMIO_SIZE
VIRTIO_MMIO_STRIDE = VIRTIO_MMIO_SIZE
VIRTIO_FIRST_GSI = 5
VIRTIO_MAX_DEVICES = 16       # GSI 5..20 stay below the IOAPIC's 24 pins

IOAPIC_ADDR = 0xFEC00000      # in-kernel IOAPIC (KVM_CREATE_IRQCHIP), also in the MADT
IOAPIC_PINS = kb.KVM_IOAPIC_NUM_PINS
LAPIC_ADDR = 0xFEE00000       # in-kernel local APIC base (default IA32_APIC_BASE), also in the MADT
TSS_ADDR = 0xFFFBD000         # KVM_SET_TSS_ADDR: 3 pages KVM needs on VMX, inside the hole, unused
IDENTITY_MAP_ADDR = 0xFFFBC000   # KVM_SET_IDENTITY_MAP_ADDR (one page just below the TSS)

# ---- virtio-fs DAX windows: guest-physical ranges above all RAM (never in the e820 map) --------
# Each window (shared memory region 0 of its device) starts on a 1 GiB boundary above the end of
# RAM and never below 4 GiB: the guest hot-plugs struct pages for it (ZONE_DEVICE), which wants
# section-aligned space that no RAM or 32-bit MMIO shares.
DAX_WINDOW_ALIGN = GiB


def dax_window_addrs(ram_end: int, sizes: list[int]) -> list[int]:
    """Guest-physical bases of DAX windows of ``sizes`` bytes, in order, above ``ram_end``."""
    def up(x: int) -> int:
        return -(-x // DAX_WINDOW_ALIGN) * DAX_WINDOW_ALIGN

    base = up(max(ram_end, HIGH_RAM_START))
    out = []
    for size in sizes:
        out.append(base)
        base = up(base + size)
    return out


# ---- legacy ports and their ISA IRQs --------------------------------------------------------
COM1_PORT = 0x3F8
COM1_PORT_SIZE = serial.IO_SIZE
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = I8042_DATA_PORT + i8042.COMMAND_PORT_OFFSET   # 0x64: 0xFE here = CPU reset (reboot=k)
I8042_PORT_SIZE = i8042.IO_SIZE   # 0x60..0x64 as one range
I8042_IRQ = 1
ACPI_PM_PORT = 0x600          # sleep control/status and reset register (FADT); S5 write = power off
ACPI_PM_PORT_SIZE = acpi_pm.IO_SIZE


def virtio_mmio_addr(index: int) -> int:
    """Guest-physical base of the ``index``-th virtio-mmio window."""
    if not 0 <= index < VIRTIO_MAX_DEVICES:
        raise ValueError(f"virtio-mmio device index {index} out of range")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_STRIDE


def virtio_gsi(index: int) -> int:
    """GSI (IOAPIC pin) of the ``index``-th virtio-mmio device."""
    if not 0 <= index < VIRTIO_MAX_DEVICES:
        raise ValueError(f"virtio-mmio device index {index} out of range")
    return VIRTIO_FIRST_GSI + index


# e820 types (boot.rst / ACPI spec) of the entries the zero page uses
E820_RAM = 1
E820_RESERVED = 2
