"""guest/initramfs.py: the newc archive must be what the kernel's unpacker (and GNU cpio) reads."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from guest.initramfs import InitramfsError, build_initramfs


def parse_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """Independent reader following buffer-format.rst: (name, mode, data) per entry, no trailer."""
    out = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize, check = fields[1], fields[6], fields[11], fields[12]
        assert check == 0
        name_start = pos + 110
        name = data[name_start:name_start + namesize]
        assert name.endswith(b"\0") and b"\0" not in name[:-1]
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == b"TRAILER!!!\0":
            assert pos == len(data), "bytes after the trailer"
            return out
        out.append((name[:-1].decode(), mode, body))


def test_layout_parents_first_and_contents():
    files = {"/pyvmm/script": b"echo hi\nexit 0\n", "a/b/c.bin": bytes(range(256)) * 3, "top": b""}
    entries = parse_newc(build_initramfs(files))
    names = [e[0] for e in entries]
    assert names == ["a", "a/b", "a/b/c.bin", "pyvmm", "pyvmm/script", "top"]
    by_name = {n: (m, d) for n, m, d in entries}
    for d in ("a", "a/b", "pyvmm"):
        assert stat.S_ISDIR(by_name[d][0]) and by_name[d][1] == b""
    assert stat.S_ISREG(by_name["pyvmm/script"][0])
    assert by_name["pyvmm/script"][1] == files["/pyvmm/script"]
    assert by_name["a/b/c.bin"][1] == files["a/b/c.bin"]
    assert by_name["top"][1] == b""


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 111, 4096])
def test_every_entry_is_4_byte_aligned(size):
    data = build_initramfs({"x" * (size % 7 + 1): b"z" * size})
    assert len(data) % 4 == 0
    assert parse_newc(data)[0][2] == b"z" * size


def test_deterministic_and_order_independent():
    a = build_initramfs({"p/one": b"1", "p/two": b"2"})
    b = build_initramfs({"p/two": b"2", "p/one": b"1"})
    assert a == b


@pytest.mark.parametrize("bad", ["", "/", "a/../b", "./a", "a/\0b"])
def test_rejects_bad_paths(bad):
    with pytest.raises(InitramfsError):
        build_initramfs({bad: b"x"})


def test_rejects_file_used_as_directory():
    with pytest.raises(InitramfsError):
        build_initramfs({"a": b"file", "a/b": b"x"})


def test_rejects_duplicate_spellings():
    with pytest.raises(InitramfsError):
        build_initramfs({"/a": b"1", "a": b"2"})


def _cpio() -> str:
    path = shutil.which("cpio")
    # .ci/setup.sh installs it; a missing one is a broken set-up, not a reason to skip.
    assert path, "GNU cpio missing: run .ci/setup.sh (package cpio)"
    return path


def test_gnu_cpio_lists_and_extracts(tmp_path: Path):
    cpio = _cpio()
    files = {"pyvmm/script": b"mark x\n", "d/e/f": b"\x00\xffdata"}
    archive = build_initramfs(files)
    listing = subprocess.run([cpio, "-t", "--quiet"], input=archive, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["d", "d/e", "d/e/f", "pyvmm", "pyvmm/script"]
    subprocess.run([cpio, "-i", "-d", "--quiet"], input=archive, cwd=tmp_path, check=True)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
    assert (tmp_path / "pyvmm").is_dir()
