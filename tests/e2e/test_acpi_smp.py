"""ACPI discovery and SMP in real guests: the MADT brings up N vCPUs, the DSDT's LNRO0005 devices
replace `virtio_mmio.device=` on the command line, and ACPI S5 powers the guest off."""

from __future__ import annotations

import zlib

from guest.script import pattern
from tests.e2e.helpers import assert_ok, fs_metrics, share, steps_by_op


def test_acpi_discovery_mounts_the_share(boot, tmp_path):
    hello = b"found through ACPI\n"
    (tmp_path / "hello").write_bytes(hello)
    r = boot("read /mnt/share/hello\nwrite /mnt/share/out 8192 5\nexit 0\n",
             shares=(share(tmp_path),), discovery="acpi")
    assert_ok(r)
    assert "virtio_mmio.device=" not in r.cmdline and "acpi=off" not in r.cmdline
    assert steps_by_op(r, "read")[0].extra["crc32"] == f"0x{zlib.crc32(hello):08x}"
    assert (tmp_path / "out").read_bytes() == pattern(8192, 5)
    assert "ACPI Error" not in r.output and "ACPI BIOS Error" not in r.output


def test_four_vcpus_online_and_file_workload(boot, tmp_path):
    r = boot("cpus\nwrite /mnt/share/f 262144 3\nread /mnt/share/f\nprobe /mnt/share 10 5 expect=ENOENT\n"
             "exit 0\n", shares=(share(tmp_path, negative_timeout=30),), vcpus=4)
    assert_ok(r)
    assert steps_by_op(r, "cpus")[0].extra["cpus"] == "4"
    assert (tmp_path / "f").read_bytes() == pattern(262144, 3)
    # 10 probed names plus the name `write` created (looked up first, missing then).
    assert fs_metrics(r)["lookup_negative"] == 11


def test_acpi_poweroff_ends_the_vm(boot, tmp_path):
    r = boot("poweroff\n", discovery="acpi")
    assert r.stop.reason.name == "GUEST_POWEROFF", (r.stop, r.output[-2000:])
    assert r.exit_status == 0


def test_discovery_both_still_gives_one_working_device(boot, tmp_path):
    """Announced on the command line and in the DSDT: the second registration of the same window
    fails harmlessly in the guest and the share works once."""
    r = boot("write /mnt/share/x 100 1\nread /mnt/share/x\nexit 0\n",
             shares=(share(tmp_path),), discovery="both")
    assert r.exit_status == 0, (r.message, r.output[-3000:])
    assert "virtio_mmio.device=" in r.cmdline
    assert (tmp_path / "x").read_bytes() == pattern(100, 1)
    assert fs_metrics(r)["ops"]["INIT"] == 1


def test_two_and_eight_vcpus_come_online(boot):
    for n in (2, 8):
        r = boot("cpus\nexit 0\n", vcpus=n)
        assert_ok(r)
        assert steps_by_op(r, "cpus")[0].extra["cpus"] == str(n)
