"""The struct table in fuse/abi.py against the real UAPI header, via a gcc-compiled probe.

The probe is generated from the table itself, so a misspelt field fails to compile, a wrong
width or order shows up as an offset/size mismatch, and a missing field shows up as a sizeof
mismatch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fuse import abi

HEADER = Path("/usr/include/linux/fuse.h")



@pytest.fixture(autouse=True)
def _toolchain() -> None:
    # .ci/setup.sh installs gcc (build-essential) and the UAPI headers (linux-libc-dev): a missing
    # one is a broken set-up, said as a failure rather than a quiet skip.
    assert shutil.which("gcc"), "gcc missing: run .ci/setup.sh (build-essential)"
    assert HEADER.exists(), f"{HEADER} missing: run .ci/setup.sh (linux-libc-dev)"


def _compile_and_run(tmp_path: Path, body: str) -> str:
    src = tmp_path / "probe.c"
    exe = tmp_path / "probe"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n"
        "#include <linux/fuse.h>\n#include <linux/fs.h>\n#include <dirent.h>\n"
        "int main(void) {\n" + body + "return 0;\n}\n"
    )
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-o", str(exe), str(src)], check=True,
                   capture_output=True, text=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def _member_size_expr(struct_name: str, dotted: str) -> str:
    return f"sizeof(((struct {struct_name} *)0)->{dotted})"


def test_struct_layouts_match_gcc(tmp_path: Path) -> None:
    lines = []
    for name, layout in abi.LAYOUTS.items():
        lines.append(f'printf("S {name} %zu\\n", sizeof(struct {name}));')
        for dotted, _off, size in layout.flat_fields:
            size_expr = "0" if size == 0 else _member_size_expr(name, dotted)
            lines.append(
                f'printf("F {name} {dotted} %zu %zu\\n", offsetof(struct {name}, {dotted}), '
                f"(size_t){size_expr});"
            )
    out = _compile_and_run(tmp_path, "\n".join(lines) + "\n")
    got_sizes: dict[str, int] = {}
    got_fields: dict[tuple[str, str], tuple[int, int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "S":
            got_sizes[parts[1]] = int(parts[2])
        else:
            got_fields[(parts[1], parts[2])] = (int(parts[3]), int(parts[4]))
    assert set(got_sizes) == set(abi.LAYOUTS)
    mismatches = []
    for name, layout in abi.LAYOUTS.items():
        if layout.size != got_sizes[name]:
            mismatches.append(f"sizeof {name}: table {layout.size} C {got_sizes[name]}")
        for dotted, off, size in layout.flat_fields:
            c_off, c_size = got_fields[(name, dotted)]
            if (off, size) != (c_off, c_size):
                mismatches.append(f"{name}.{dotted}: table ({off},{size}) C ({c_off},{c_size})")
    assert not mismatches, "\n".join(mismatches)


def test_required_structs_present() -> None:
    required = """fuse_in_header fuse_out_header fuse_attr fuse_entry_out fuse_attr_out fuse_init_in
    fuse_init_out fuse_getattr_in fuse_setattr_in fuse_open_in fuse_open_out fuse_create_in
    fuse_read_in fuse_write_in fuse_write_out fuse_release_in fuse_flush_in fuse_fsync_in
    fuse_mknod_in fuse_mkdir_in fuse_rename_in fuse_rename2_in fuse_link_in fuse_forget_in
    fuse_batch_forget_in fuse_forget_one fuse_statfs_out fuse_kstatfs fuse_setxattr_in
    fuse_getxattr_in fuse_getxattr_out fuse_access_in fuse_fallocate_in fuse_lseek_in
    fuse_lseek_out fuse_copy_file_range_in fuse_dirent fuse_direntplus fuse_interrupt_in""".split()
    assert set(required) <= set(abi.LAYOUTS)


def _header_defines(prefix_re: str) -> dict[str, str]:
    text = HEADER.read_text()
    return dict(re.findall(rf"^#define\s+({prefix_re}\w*)\s+(\(?1U?L*L?\s*<<\s*\d+\)?)",
                           text, re.M))


def test_flag_constants_match_gcc(tmp_path: Path) -> None:
    # Every single-bit flag family the server uses must be complete and equal to the header.
    families = r"(?:FATTR_|FOPEN_|FUSE_)"
    header_flags = _header_defines(families)
    assert len(header_flags) > 60
    missing = [n for n in header_flags if not hasattr(abi, n)]
    assert not missing, missing
    names = sorted(header_flags) + ["RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_WHITEOUT",
                                    "DT_UNKNOWN", "DT_FIFO", "DT_CHR", "DT_DIR", "DT_BLK",
                                    "DT_REG", "DT_LNK", "DT_SOCK", "DT_WHT", "FUSE_ROOT_ID",
                                    "FUSE_COMPAT_SETXATTR_IN_SIZE", "FUSE_COMPAT_WRITE_IN_SIZE",
                                    "FUSE_COMPAT_ENTRY_OUT_SIZE", "FUSE_COMPAT_ATTR_OUT_SIZE",
                                    "FUSE_COMPAT_MKNOD_IN_SIZE", "FUSE_MIN_READ_BUFFER"]
    # (1 << 31) is an int in C (INT_MIN); compare 32-bit constants as the u32 the wire carries.
    body = "".join(
        f'printf("{n} %llu\\n", (unsigned long long)({n}) & '
        f'(sizeof({n}) == 4 ? 0xffffffffULL : ~0ULL));\n'
        for n in names
    )
    out = _compile_and_run(tmp_path, body)
    got = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    bad = {n: (getattr(abi, n), got[n]) for n in names if getattr(abi, n) != got[n]}
    assert not bad, bad


def test_opcodes_match_header(tmp_path: Path) -> None:
    text = HEADER.read_text()
    enum_body = re.search(r"enum fuse_opcode \{(.*?)\};", text, re.S).group(1)
    header_ops = {n: int(v) for n, v in re.findall(r"\b(FUSE_[A-Z0-9_]+)\s*=\s*(\d+)", enum_body)}
    header_ops.pop("FUSE_INIT_BSWAP_RESERVED")
    ours = {"FUSE_" + op.name: int(op) for op in abi.Opcode}
    assert ours == header_ops
    body = "".join(f'printf("{n} %d\\n", (int){n});\n' for n in ours)
    out = _compile_and_run(tmp_path, body)
    assert {k: int(v) for k, v in (line.split() for line in out.splitlines())} == ours
    assert abi.FUSE_LOOKUP == abi.Opcode.LOOKUP == 1


def test_layout_roundtrip_nested_and_arrays() -> None:
    init = abi.INIT_OUT.pack(major=7, minor=37, unused=(1, 2, 3, 4, 5, 6, 7))
    assert len(init) == 64
    back = abi.INIT_OUT.unpack(init)
    assert back.minor == 37 and back.unused == (1, 2, 3, 4, 5, 6, 7)
    attr = abi.ATTR.zero()._replace(ino=5, mode=0o100644)
    raw = abi.ENTRY_OUT.pack(nodeid=9, attr=attr)
    assert abi.ENTRY_OUT.unpack(raw).attr.ino == 5
    assert raw[abi.ENTRY_OUT.offset_of("attr.mode"):][:4] == (0o100644).to_bytes(4, "little")
    with pytest.raises(ValueError):
        abi.INIT_OUT.pack(unused=(1, 2))
    assert abi.dirent_size(1) == 32 and abi.dirent_size(8) == 32 and abi.dirent_size(9) == 40
    assert abi.direntplus_size(0) == 152
