"""The README's example guest test, verbatim: written only against the plugin's documented API
(``guest`` fixture, ``Share``, ``GuestResult.check``/``device``) so it fails if that API breaks."""

from vmm.testing import Share


def test_missing_names_are_cached(guest, tmp_path):
    result = guest.run("stat /mnt/data/missing x100 expect=ENOENT",
                       shares=[Share(tmp_path, "data", negative_timeout=60)])
    result.check()                                   # exit 0, every step as expected
    assert result.device("data").lookups == 1        # 99 stats answered by the guest
    assert result.device("data").lookups_of("missing") == 1


def test_vm_share_files_and_step_results(guest, vm_share):
    share = vm_share("data", files={"hello.txt": b"hello from the host\n"}, cache="always")
    result = guest.run("read /mnt/data/hello.txt; stat /mnt/data/nope expect=ENOENT; exit 7",
                       shares=[share])
    assert result.exit_status == 7
    (read,) = result.steps_of("read")
    assert read.ok and read.extra["size"] == "20"
    assert result.device("data").count("READ") >= 1
    assert result.device("data").lookups_of("nope") == 1
