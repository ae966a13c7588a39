"""DAX window: host mappings and their bookkeeping, FUSE_SETUPMAPPING/REMOVEMAPPING through the
FUSE server (every offset, length and flag the guest sends is checked), the virtio-mmio shared
memory registers, the options/config keys and where the VMM puts the window.

The window is real: reserved host address space with real files mmap'ed into it, read and written
through ctypes at its host address, and /proc/self/maps says what is mapped where.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

import pytest

from devices.memory import GuestMemory
from devices.virtio.fs.dax import INODE_FH, DaxWindow, WindowFaults
from devices.virtio.fs.device import FsDevice
from devices.virtio.fs.options import FsOptions
from devices.virtio.mmio import MmioTransport
from fuse import abi
from fuse.abi import Opcode
from fuse.limits import RequestError
from fuse.server import Server
from test_fuse_memfs import MemFS, cstr, do_init, request, send
from vmm import layout
from vmm.config import ConfigError, load_config, parse_shared_dir

PAGE = 4096
R = abi.FUSE_SETUPMAPPING_FLAG_READ
W = abi.FUSE_SETUPMAPPING_FLAG_WRITE


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def prot_at(addr: int) -> str | None:
    """The permissions /proc/self/maps gives the host page at ``addr`` (e.g. 'r--s', '---p')."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms
    return None


@pytest.fixture
def window():
    w = DaxWindow(16 * PAGE)
    yield w
    w.close()


@pytest.fixture
def datafile(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.write_bytes(pattern(8 * PAGE))
    return p


def mapped(window: DaxWindow, moffset: int, n: int) -> bytes:
    return ctypes.string_at(window.host_addr + moffset, n)


# ---- the window itself ----------------------------------------------------------------------

def test_reserved_window_is_inaccessible_address_space(window: DaxWindow) -> None:
    assert prot_at(window.host_addr) == "---p"
    assert prot_at(window.host_addr + window.size - 1) == "---p"
    assert window.mappings() == []


def test_read_only_mapping_shows_the_file(window: DaxWindow, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    try:
        window.map(2 * PAGE, fd, PAGE, 3 * PAGE, writable=False)
    finally:
        os.close(fd)      # the window keeps its own reference
    assert mapped(window, 2 * PAGE, 3 * PAGE) == datafile.read_bytes()[PAGE:4 * PAGE]
    assert prot_at(window.host_addr + 2 * PAGE) == "r--s"
    assert prot_at(window.host_addr + PAGE) == "---p"
    assert window.mappings() == [(2 * PAGE, 3 * PAGE, PAGE, False, None)]


def test_writable_mapping_writes_reach_the_host_file(window: DaxWindow, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDWR)
    try:
        window.map(0, fd, 0, 2 * PAGE, writable=True)
    finally:
        os.close(fd)
    ctypes.memmove(window.host_addr + PAGE + 10, b"through the window", 18)
    with open(datafile, "rb") as f:
        f.seek(PAGE + 10)
        assert f.read(18) == b"through the window"


def test_unmap_puts_the_reservation_back(window: DaxWindow, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    window.map(0, fd, 0, 4 * PAGE, writable=False)
    os.close(fd)
    window.unmap(PAGE, 2 * PAGE)                       # a hole in the middle: split in two
    assert window.mappings() == [(0, PAGE, 0, False, None), (3 * PAGE, PAGE, 3 * PAGE, False, None)]
    assert prot_at(window.host_addr + PAGE) == "---p"
    assert mapped(window, 3 * PAGE, PAGE) == datafile.read_bytes()[3 * PAGE:4 * PAGE]
    assert window.open_files == 1
    window.unmap(0, window.size)
    assert window.mappings() == [] and window.open_files == 0


def test_a_new_mapping_replaces_what_it_overlaps(window: DaxWindow, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(pattern(4 * PAGE, 1))
    b.write_bytes(pattern(4 * PAGE, 2))
    for p, mo in ((a, 0), (b, 2 * PAGE)):
        fd = os.open(p, os.O_RDONLY)
        window.map(mo, fd, 0, 4 * PAGE, writable=False)
        os.close(fd)
    assert [m[:2] for m in window.mappings()] == [(0, 2 * PAGE), (2 * PAGE, 4 * PAGE)]
    assert mapped(window, 0, 2 * PAGE) == a.read_bytes()[:2 * PAGE]
    assert mapped(window, 2 * PAGE, 4 * PAGE) == b.read_bytes()
    assert window.open_files == 2


def test_mappings_of_a_handle_die_with_it(window: DaxWindow, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    window.map(0, fd, 0, PAGE, False, owner=7)
    window.map(PAGE, fd, 0, PAGE, False, owner=8)
    window.map(2 * PAGE, fd, 0, PAGE, False, owner=None)
    os.close(fd)
    assert window.drop_owner(7) == 1
    assert [m[0] for m in window.mappings()] == [PAGE, 2 * PAGE]
    assert prot_at(window.host_addr) == "---p"


def test_reset_unmaps_everything_and_closes_the_files(window: DaxWindow, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    window.map(0, fd, 0, PAGE, False)
    window.map(4 * PAGE, fd, PAGE, 2 * PAGE, False)
    os.close(fd)
    window.reset()
    assert window.mappings() == [] and window.open_files == 0
    assert prot_at(window.host_addr + 4 * PAGE) == "---p"


@pytest.mark.parametrize("moffset,length", [
    (1, PAGE), (0, PAGE + 1), (0, 0), (-PAGE, PAGE), (15 * PAGE, 2 * PAGE), (16 * PAGE, PAGE),
    (1 << 63, PAGE),
])
def test_ranges_outside_or_unaligned_are_refused(window: DaxWindow, datafile: Path,
                                                 moffset: int, length: int) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    try:
        with pytest.raises(RequestError) as ei:
            window.map(moffset, fd, 0, length, False)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(RequestError):
            window.unmap(moffset, length)
        with pytest.raises(RequestError):
            window.map(0, fd, 1, PAGE, False)            # file offset not page aligned
    finally:
        os.close(fd)
    assert window.mappings() == [] and window.open_files == 0


def test_writable_mapping_of_a_read_only_fd_fails_cleanly(window: DaxWindow, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            window.map(0, fd, 0, PAGE, writable=True)
    finally:
        os.close(fd)
    assert ei.value.errno == errno.EACCES
    assert window.mappings() == [] and window.open_files == 0
    assert prot_at(window.host_addr) == "---p"


def test_truncated_file_pages_are_repaired_with_zeros(window: DaxWindow, datafile: Path) -> None:
    fd = os.open(datafile, os.O_RDONLY)
    window.map(0, fd, 0, 8 * PAGE, False)
    os.close(fd)
    assert window.repair_truncated() == 0            # nothing past EOF yet
    os.truncate(datafile, PAGE + 100)
    assert window.repair_truncated() == 1
    # Touching the window past the new EOF would SIGBUS this process without the repair.
    assert mapped(window, 2 * PAGE, 6 * PAGE) == bytes(6 * PAGE)
    assert mapped(window, 0, PAGE) == pattern(PAGE)
    assert window.repair_truncated() == 0            # repaired once: a second EFAULT is fatal
    assert window.metrics()["truncation_repairs"] == 1


# ---- through the FUSE server ----------------------------------------------------------------

@pytest.fixture
def dax_dev(tmp_path: Path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(pattern(4 * PAGE, 3))
    dev = FsDevice(FsOptions(str(share), "t", dax=True, sandbox="none", dax_window_mib=2))
    yield dev
    dev.close()


def setup_body(fh: int, foffset: int, length: int, flags: int, moffset: int) -> bytes:
    return abi.SETUPMAPPING_IN.pack(fh=fh, foffset=foffset, len=length, flags=flags,
                                    moffset=moffset)


def remove_body(*ranges: tuple[int, int], count: int | None = None) -> bytes:
    body = abi.REMOVEMAPPING_IN.pack(count=len(ranges) if count is None else count)
    return body + b"".join(abi.REMOVEMAPPING_ONE.pack(moffset=m, len=n) for m, n in ranges)


def lookup_f(server: Server) -> int:
    r = send(server, request(Opcode.LOOKUP, cstr(b"f")))
    assert r is not None and r.error == 0
    return abi.ENTRY_OUT.unpack(r.payload).nodeid


def test_init_announces_map_alignment_only_with_a_window(dax_dev: FsDevice, tmp_path: Path) -> None:
    out = do_init(dax_dev.server)
    assert out.flags & abi.FUSE_MAP_ALIGNMENT and out.map_alignment == 12
    plain = Server(MemFS(tmp_path))
    out = do_init(plain)
    assert not out.flags & abi.FUSE_MAP_ALIGNMENT and out.map_alignment == 0


def test_setupmapping_by_inode_maps_the_file(dax_dev: FsDevice) -> None:
    s, w = dax_dev.server, dax_dev.dax_window
    do_init(s)
    nid = lookup_f(s)
    r = send(s, request(Opcode.SETUPMAPPING, setup_body(INODE_FH, 0, 2 << 20, R, 0), nodeid=nid))
    assert r is not None and r.error == 0 and r.payload == b""
    assert mapped(w, 0, 4 * PAGE) == pattern(4 * PAGE, 3)
    r = send(s, request(Opcode.REMOVEMAPPING, remove_body((0, 2 << 20))))
    assert r is not None and r.error == 0
    assert w.mappings() == [] and prot_at(w.host_addr) == "---p"
    assert dax_dev.metrics()["dax"]["setups"] == 1


def test_mappings_through_a_handle_die_at_release(dax_dev: FsDevice) -> None:
    s, w = dax_dev.server, dax_dev.dax_window
    do_init(s)
    nid = lookup_f(s)
    r = send(s, request(Opcode.OPEN, abi.OPEN_IN.pack(flags=os.O_RDONLY, open_flags=0), nodeid=nid))
    fh = abi.OPEN_OUT.unpack(r.payload).fh
    r = send(s, request(Opcode.SETUPMAPPING, setup_body(fh, 0, PAGE, R | W, 0), nodeid=nid))
    assert r.error == -errno.EACCES                     # writable through a read-only handle
    r = send(s, request(Opcode.SETUPMAPPING, setup_body(fh, 0, PAGE, R, PAGE), nodeid=nid))
    assert r.error == 0 and len(w.mappings()) == 1
    send(s, request(Opcode.RELEASE, abi.RELEASE_IN.pack(fh=fh, flags=0, release_flags=0,
                                                        lock_owner=0), nodeid=nid))
    assert w.mappings() == []


def test_session_end_and_reset_clear_the_window(dax_dev: FsDevice) -> None:
    s, w = dax_dev.server, dax_dev.dax_window
    do_init(s)
    nid = lookup_f(s)
    send(s, request(Opcode.SETUPMAPPING, setup_body(INODE_FH, 0, PAGE, R, 0), nodeid=nid))
    assert len(w.mappings()) == 1
    dax_dev.reset()                                  # the driver wrote Status 0
    assert w.mappings() == [] and w.open_files == 0


@pytest.mark.parametrize("body,why", [
    (setup_body(INODE_FH, 0, PAGE, R | 4, 0), "unknown flag"),
    (setup_body(INODE_FH, 0, 0, R, 0), "empty"),
    (setup_body(INODE_FH, 0, PAGE, R, 3), "unaligned window offset"),
    (setup_body(INODE_FH, 5, PAGE, R, 0), "unaligned file offset"),
    (setup_body(INODE_FH, 0, PAGE + 1, R, 0), "unaligned length"),
    (setup_body(INODE_FH, 0, 4 << 20, R, 0), "longer than the window"),
    (setup_body(INODE_FH, 0, PAGE, R, 2 << 20), "past the window"),
    (setup_body(INODE_FH, 0, PAGE, R, (1 << 64) - PAGE), "offset wraps"),
    (setup_body(INODE_FH, (1 << 64) - PAGE, 2 * PAGE, R, 0), "file offset wraps"),
])
def test_bad_setupmapping_is_einval(dax_dev: FsDevice, body: bytes, why: str) -> None:
    s = dax_dev.server
    do_init(s)
    nid = lookup_f(s)
    r = send(s, request(Opcode.SETUPMAPPING, body, nodeid=nid))
    assert r is not None and r.error == -errno.EINVAL, why
    assert dax_dev.dax_window.mappings() == []


def test_setupmapping_of_a_directory_or_unknown_node(dax_dev: FsDevice) -> None:
    s = dax_dev.server
    do_init(s)
    r = send(s, request(Opcode.SETUPMAPPING, setup_body(INODE_FH, 0, PAGE, R, 0), nodeid=1))
    assert r.error == -errno.EINVAL
    r = send(s, request(Opcode.SETUPMAPPING, setup_body(INODE_FH, 0, PAGE, R, 0), nodeid=999))
    assert r.error < 0
    r = send(s, request(Opcode.SETUPMAPPING, setup_body(12345, 0, PAGE, R, 0), nodeid=1))
    assert r.error < 0
    assert dax_dev.dax_window.mappings() == []


@pytest.mark.parametrize("body,why", [
    (remove_body(count=0), "no entries"),
    (remove_body((0, PAGE), count=2), "count beyond the request"),
    (remove_body((0, PAGE), (PAGE, PAGE), count=1), "bytes beyond count"),
    (remove_body(*[(0, PAGE)] * 257), "more than FUSE_REMOVEMAPPING_MAX_ENTRY"),
    (remove_body((0, PAGE), (3, PAGE)), "one unaligned entry"),
    (remove_body((0, 4 << 20)), "past the window"),
    (remove_body(((1 << 64) - PAGE, 2 * PAGE)), "wraps"),
])
def test_bad_removemapping_is_einval_and_changes_nothing(dax_dev: FsDevice, body: bytes,
                                                         why: str) -> None:
    s, w = dax_dev.server, dax_dev.dax_window
    do_init(s)
    nid = lookup_f(s)
    send(s, request(Opcode.SETUPMAPPING, setup_body(INODE_FH, 0, PAGE, R, 0), nodeid=nid))
    r = send(s, request(Opcode.REMOVEMAPPING, body))
    assert r is not None and r.error == -errno.EINVAL, why
    assert len(w.mappings()) == 1                    # all or nothing


def test_without_a_window_the_opcodes_are_enosys(tmp_path: Path) -> None:
    s = Server(MemFS(tmp_path))
    do_init(s)
    r = send(s, request(Opcode.SETUPMAPPING, setup_body(INODE_FH, 0, PAGE, R, 0)))
    assert r.error == -errno.ENOSYS
    r = send(s, request(Opcode.REMOVEMAPPING, remove_body((0, PAGE))))
    assert r.error == -errno.ENOSYS


# ---- virtio-mmio shared memory registers ----------------------------------------------------

def shm(t: MmioTransport, sel: int) -> tuple[int, int]:
    t.write(0xAC, struct.pack("<I", sel))
    r = [struct.unpack("<I", t.read(off, 4))[0] for off in (0xB0, 0xB4, 0xB8, 0xBC)]
    return r[0] | r[1] << 32, r[2] | r[3] << 32


def test_mmio_reports_the_window_as_shm_region_0(dax_dev: FsDevice) -> None:
    irq = os.eventfd(0, os.EFD_CLOEXEC)
    t = MmioTransport(dax_dev, GuestMemory.from_ranges([(0, 1 << 20)]), irq)
    try:
        assert shm(t, 0) == ((1 << 64) - 1, (1 << 64) - 1)     # not placed yet: absent
        dax_dev.place_dax_window(0x1_4000_0000)
        assert shm(t, 0) == (2 << 20, 0x1_4000_0000)
        assert shm(t, 1)[0] == (1 << 64) - 1                    # no region 1: length ~0
    finally:
        t.close()
        os.close(irq)


# ---- options, config, layout, mount line ----------------------------------------------------

def test_options_validate_the_window(tmp_path: Path) -> None:
    assert FsOptions(str(tmp_path), "t").dax is False
    assert FsOptions(str(tmp_path), "t", dax=True, sandbox="none").dax_window_mib == 1024
    for bad in (0, 3, -2, 1 << 17, True, "64"):
        with pytest.raises(ValueError, match="dax_window_mib"):
            FsOptions(str(tmp_path), "t", dax=True, sandbox="none", dax_window_mib=bad)
    with pytest.raises(ValueError, match="dax is false"):
        FsOptions(str(tmp_path), "t", dax_window_mib=64)
    with pytest.raises(ValueError, match="dax must be a bool"):
        FsOptions(str(tmp_path), "t", dax="yes", sandbox="none")
    # A jailed back-end maps into the VMM's window over the back-end request channel.
    for mode in ("namespace", "chroot"):
        assert FsOptions(str(tmp_path), "t", dax=True, sandbox=mode).dax is True


def test_a_foreign_back_end_gets_no_dax_window(tmp_path: Path) -> None:
    from vmm.config import parse_vhost_user_fs
    for item in ("dax=true", "dax_window_mib=64"):
        with pytest.raises(ConfigError, match="not offered for a foreign back-end") as err:
            parse_vhost_user_fs(f"{tmp_path}/s.sock:t:{item}")
        assert "\n" not in str(err.value)
    p = tmp_path / "vm.yaml"
    p.write_text(f"devices:\n  - type: vhost-user-fs\n    socket: {tmp_path}/s.sock\n    tag: t\n"
                 "    dax: true\n")
    with pytest.raises(ConfigError, match="dax: not offered for a foreign back-end"):
        load_config(p)


def test_yaml_and_shared_dir_keys(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    opts = parse_shared_dir(f"{share}:t:sandbox=none:dax=true:dax_window_mib=64")
    assert opts.dax is True and opts.dax_window_mib == 64
    with pytest.raises(ConfigError, match="dax: expected true or false"):
        parse_shared_dir(f"{share}:t:dax=1")
    with pytest.raises(ConfigError, match="dax_window_mib"):
        parse_shared_dir(f"{share}:t:sandbox=none:dax=true:dax_window_mib=x")
    with pytest.raises(ConfigError, match="dax_window_mib"):
        parse_shared_dir(f"{share}:t:sandbox=none:dax=true:dax_window_mib=5")
    p = tmp_path / "vm.yaml"
    p.write_text(f"devices:\n  - type: fs\n    source: {share}\n    tag: d\n    sandbox: none\n    dax: true\n"
                 "    dax_window_mib: 128\n")
    (dev,) = load_config(p).devices
    assert dev.dax is True and dev.dax_window_mib == 128
    p.write_text(f"devices:\n  - type: fs\n    source: {share}\n    tag: d\n    dax: 1\n")
    with pytest.raises(ConfigError, match="dax"):
        load_config(p)


def test_windows_go_above_ram_on_gib_boundaries() -> None:
    GiB = 1 << 30
    assert layout.dax_window_addrs(256 << 20, [64 << 20]) == [4 * GiB]
    assert layout.dax_window_addrs(6 * GiB + 1, [GiB, 2 * GiB, 64 << 20]) == [7 * GiB, 8 * GiB,
                                                                              10 * GiB]


def test_a_dax_share_is_mounted_dax_always_and_needs_the_dax_kernel(tmp_path: Path) -> None:
    from vmm.config import Config
    from vmm.machine import mount_lines, wants_dax
    a = FsOptions(str(tmp_path), "a", dax=True, sandbox="none", dax_window_mib=64)
    b = FsOptions(str(tmp_path), "b")
    assert mount_lines(Config(devices=(a, b))) == "mount a /mnt/a dax=always\nmount b /mnt/b\n"
    assert wants_dax(a) and not wants_dax(b)


# ---- a vCPU touching a truncated page (real KVM) --------------------------------------------

WINDOW_GPA = 0x20000
# .code16: ds = 0x2000 (the window); al = [0] -> out 0x500; al = [0x1000] (page 1) -> out 0x500;
# out 0x501 (done); hlt
TOUCH_CODE = bytes.fromhex("b800208ed8a00000ba0005eea00010ee42eef4")


def run_touch(window: DaxWindow, on_fault) -> tuple[list, bytes]:
    """Run TOUCH_CODE with the window at WINDOW_GPA; returns (stops, bytes the guest sent)."""
    import threading

    from kvm_sys import Kvm
    from vmm.bus import Bus
    from vmm.memory import GuestMemory as VmmMemory
    from vmm.vcpu import VcpuThread

    memory = VmmMemory.from_ranges([(0, 0x10000)])
    memory.write(0x1000, TOUCH_CODE)
    stops: list = []
    stopping = threading.Event()
    sent = bytearray()

    class Port:
        def read(self, offset: int, size: int) -> bytes:
            return bytes(size)

        def write(self, offset: int, data: bytes) -> None:
            if offset == 0:
                sent.extend(data)
            else:
                stopping.set()

    pio, mmio = Bus("pio"), Bus("mmio")
    pio.insert(0x500, 2, Port(), "port")
    if on_fault is not None:       # what the VMM does: the window on the MMIO bus, and the hook
        mmio.insert(WINDOW_GPA, window.size, WindowFaults(window, "t"), "dax-window")
    with Kvm() as kvm, kvm.create_vm() as vm:
        memory.register(vm)
        vm.set_user_memory_region(1, WINDOW_GPA, window.size, window.host_addr)
        with vm.create_vcpu(0) as vcpu:
            sregs = vcpu.get_sregs()
            sregs.cs.base = sregs.cs.selector = 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = 0x1000, 2
            vcpu.set_regs(regs)
            t = VcpuThread(vcpu, pio, mmio, memory,
                           lambda s: (stops.append(s), stopping.set()), stopping)
            t.on_fault = on_fault
            t.start()
            t.join(60)
            assert not t.is_alive(), "guest did not finish"
    memory.close()
    return stops, bytes(sent)


@pytest.mark.skipif(not os.path.exists("/dev/kvm"),
                    reason="!!! /dev/kvm is absent: the vCPU fault path CANNOT be tested here !!!")
@pytest.mark.parametrize("repair", [False, True])
def test_vcpu_touching_a_truncated_page(window: DaxWindow, datafile: Path, repair: bool) -> None:
    """The page past the new EOF: KVM cannot map it, and nothing reaches this process as SIGBUS.
    Executed directly, KVM_RUN fails with EFAULT; emulated (kvm_pvm), the access exits as MMIO at
    the window. With what the VMM installs (the fault hook and the window on the MMIO bus) the
    page is repaired and the guest reads a zero and runs on. Without, the guest does not get
    the old byte: the vCPU stops on EFAULT, or the read is an unclaimed MMIO read (all ones)."""
    fd = os.open(datafile, os.O_RDONLY)
    window.map(0, fd, 0, 4 * PAGE, False)
    os.close(fd)
    os.truncate(datafile, PAGE)
    stops, sent = run_touch(window, window.repair_truncated if repair else None)
    first = datafile.read_bytes()[0:1]
    if repair:
        assert stops == [] and sent == first + b"\0"
        assert window.metrics()["truncation_repairs"] == 1
    else:
        assert sent[:1] == first
        assert (stops and "Bad address" in stops[0].detail) or sent[1:] == b"\xff", (stops, sent)
        assert window.metrics()["truncation_repairs"] == 0
