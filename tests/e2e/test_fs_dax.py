"""DAX end to end: a guest with the `dax` kernel variant mounts a `dax: true` share dax=always.

* A 16 MiB read (the issue's size) goes through the window: SETUPMAPPING requests, not one
  READ, and the guest's block-weighted sum64 matches the host file (sum64, not CRC-32: the
  checksum runs in this emulated guest and CRC-32 costs several times more; 16 MiB through DAX
  took 10-16 s here, through READ 23-63 s, `bench/dax_read.py --size-mib 16`).
* An in-place write (the agent's ``overwrite``: no O_TRUNC, so it does not extend the file) goes
  through the mapping too: the host file changes with no WRITE request.
* A file truncated on the host under a live mapping: the guest's next read touches pages past
  the new end of file, KVM_RUN fails with EFAULT, the VMM gives those pages zeros and the run goes
  on (the guest reads zeros where the file no longer has data; the VMM never crashes).

With the sandbox (``sandbox: namespace``, the default) the device runs in its jailed child and
the VMM keeps the window: the child maps over the vhost-user back-end request channel
(FS_MAP/FS_UNMAP). ``test_all_three_with_the_sandbox`` runs the three cases above in one boot of
that configuration (each boot of the dax kernel costs 15-30 s here, so not one per case).

The window is 64 MiB: every struct page of it is initialised by the guest at boot, which costs
boot time under kvm_pvm's emulator; 64 MiB holds 32 chunks of 2 MiB, more than these files need.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from guest.script import pattern, sum64
from vmm.testing import GuestRunner, Share

WINDOW_MIB = 64
BIG = 1 << 20
HUGE = 16 << 20        # the file size
CHUNK = 2 << 20          # Linux maps DAX in FUSE_DAX_SZ chunks


@pytest.fixture(scope="module")
def dax_guest() -> GuestRunner:
    from vmm.testing import _kvm_or_skip
    _kvm_or_skip()
    from guest.build import ensure_kernel
    kernel = ensure_kernel(variant="dax",
                           progress=lambda m: print(f"guest kernel (dax): {m}", flush=True))
    return GuestRunner(kernel)


def dax_share(root: Path, files: dict[str, bytes], sandbox: str = "none", **options) -> Share:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return Share(root, "share", dax=True, sandbox=sandbox, dax_window_mib=WINDOW_MIB, **options)


def test_read_goes_through_the_window(dax_guest: GuestRunner, tmp_path: Path) -> None:
    data = os.urandom(HUGE)
    share = dax_share(tmp_path / "s", {"big": data})
    r = dax_guest.run("read /mnt/share/big sum64", shares=[share]).check()
    (step,) = r.steps_of("read")
    assert step.get_int("size") == HUGE
    assert step.get_int("sum64") == sum64(data)
    dev = r.device("share")
    assert dev.count("READ") == 0, dev.ops
    assert dev.count("SETUPMAPPING") >= HUGE // CHUNK, dev.ops
    assert dev.raw["dax"]["setups"] == dev.count("SETUPMAPPING")


def test_in_place_write_reaches_the_host_file(dax_guest: GuestRunner, tmp_path: Path) -> None:
    size = 1 << 20
    share = dax_share(tmp_path / "s", {"w": bytes(size)})
    r = dax_guest.run(f"overwrite /mnt/share/w {size} 5", shares=[share]).check()
    assert (share.path / "w").read_bytes() == pattern(size, 5)
    dev = r.device("share")
    assert dev.count("WRITE") == 0, dev.ops
    assert dev.count("SETUPMAPPING") >= 1


def test_file_truncated_under_a_live_mapping(dax_guest: GuestRunner, tmp_path: Path) -> None:
    size, keep = 1 << 20, 256 << 10
    data = os.urandom(size)
    # Attributes cached for an hour: the guest keeps the old size and reads past the new end of
    # file through its live mapping (with the default 1 s it would ask again and stop at EOF).
    share = dax_share(tmp_path / "s", {"t": data}, cache="always", timeout=3600)
    path = share.path / "t"

    def on_line(line: bytes) -> None:
        # The first read mapped the file; cut it on the host before the second read.
        if b"name=truncate" in line and path.stat().st_size == size:
            os.truncate(path, keep)

    r = dax_guest.run("read /mnt/share/t sum64; mark truncate; sleep 200; read /mnt/share/t sum64",
                      shares=[share], on_line=on_line).check()
    first, second = r.steps_of("read")
    assert first.get_int("sum64") == sum64(data)
    assert path.stat().st_size == keep and second.get_int("size") == size
    # The guest still believes the old size (cached attributes): past the new end it reads the
    # zero pages the VMM put there instead of stopping.
    assert second.get_int("sum64") == sum64(data[:keep] + bytes(size - keep))
    assert r.device("share").raw["dax"]["truncation_repairs"] >= 1
    assert r.device("share").count("READ") == 0


def test_all_three_with_the_sandbox(dax_guest: GuestRunner, tmp_path: Path) -> None:
    """Read through the window, in-place write, truncation under a live mapping: one boot, the
    device in its jailed child, every mapping made in the VMM's window over FS_MAP."""
    big = os.urandom(BIG)
    size, keep = 1 << 20, 256 << 10
    tdata = os.urandom(size)
    # cache always + long timeouts: the truncation case needs the guest to keep the old size.
    share = dax_share(tmp_path / "s", {"big": big, "w": bytes(size), "t": tdata},
                      sandbox="namespace", cache="always", timeout=3600)
    tpath = share.path / "t"

    def on_line(line: bytes) -> None:
        if b"name=truncate" in line and tpath.stat().st_size == size:
            os.truncate(tpath, keep)

    r = dax_guest.run(f"read /mnt/share/big crc32; overwrite /mnt/share/w {size} 5; "
                      "read /mnt/share/t sum64; mark truncate; sleep 200; read /mnt/share/t sum64",
                      shares=[share], on_line=on_line).check()
    dev = r.device("share")
    assert dev.raw["sandbox"]["mode"] == "namespace", dev.raw.get("sandbox")
    big_read, first, second = r.steps_of("read")
    # 1. the read: through the window, checksum right
    assert big_read.get_int("size") == BIG and big_read.get_int("crc32") == zlib.crc32(big)
    # 2. the in-place write reached the host file
    assert (share.path / "w").read_bytes() == pattern(size, 5)
    # 3. truncation: zeros past the new end, the VMM (and the run) went on
    assert first.get_int("sum64") == sum64(tdata)
    assert tpath.stat().st_size == keep and second.get_int("size") == size
    assert second.get_int("sum64") == sum64(tdata[:keep] + bytes(size - keep))
    assert dev.count("READ") == 0 and dev.count("WRITE") == 0, dev.ops
    assert dev.count("SETUPMAPPING") >= -(-BIG // CHUNK) + 2, dev.ops
    dax = dev.raw["dax"]          # the VMM's window: what the guest really saw
    assert dax["setups"] == dev.count("SETUPMAPPING"), (dax, dev.ops)
    assert dax["channel"]["fs_map"] == dax["setups"] and dax["channel"]["refused"] == 0, dax
    assert dax["truncation_repairs"] >= 1, dax
