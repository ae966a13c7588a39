"""guest/script.py: the data pattern, the errno and op tables (in sync with the C agent), builders."""

from __future__ import annotations

import errno as pyerrno
import re
from pathlib import Path

import pytest

from guest import script
from guest.script import BLOCK, ERRNOS, OPS, Script, ScriptError, Step, errno_name, errno_number, \
    pattern, render

AGENT = Path(script.__file__).resolve().parent / "agent"


# ------------------------------------------------------------------------------------- pattern

def test_pattern_golden_start():
    # splitmix64 from state 0 starts with 0xE220A8397B1DCDAF (the reference sequence); block 0
    # keeps its first word unchanged (0 * golden = 0).
    assert pattern(8, 0) == (0xE220A8397B1DCDAF).to_bytes(8, "little")
    assert pattern(16, 0)[8:] == (0x6E789E6AA1B965F4).to_bytes(8, "little")


def test_pattern_block_word_mixing():
    data = pattern(3 * BLOCK, 5)
    base0 = int.from_bytes(data[:8], "little")
    for i in (1, 2):
        word = int.from_bytes(data[i * BLOCK:i * BLOCK + 8], "little")
        assert word == base0 ^ ((i * 0x9E3779B97F4A7C15) & (2**64 - 1))
        # the rest of every block is the base block
        assert data[i * BLOCK + 8:(i + 1) * BLOCK] == data[8:BLOCK]


@pytest.mark.parametrize("offset,size", [(0, 1), (1, 4095), (4095, 2), (4096, 4096), (5000, 20000),
                                         (123457, 77)])
def test_pattern_offset_is_a_window(offset, size):
    whole = pattern(offset + size, 42)
    assert pattern(size, 42, offset) == whole[offset:]
    assert len(pattern(size, 42, offset)) == size


def test_pattern_blocks_and_seeds_differ():
    data = pattern(64 * BLOCK, 7)
    blocks = {data[i:i + BLOCK] for i in range(0, len(data), BLOCK)}
    assert len(blocks) == 64
    assert pattern(BLOCK, 1) != pattern(BLOCK, 2)
    assert pattern(0, 9) == b""


def test_pattern_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pattern(-1, 0)
    with pytest.raises(ValueError):
        pattern(1, 2**64)


def test_pattern_constants_match_agent():
    """The C side uses the same block size and mixing constants."""
    ops = (AGENT / "ops.c").read_text()
    header = (AGENT / "agent.h").read_text()
    assert re.search(r"#define PYV_BLOCK\s+4096\b", header)
    assert "0x9E3779B97F4A7C15ULL" in ops
    assert "0xBF58476D1CE4E5B9ULL" in ops and "0x94D049BB133111EBULL" in ops
    chunk = int(re.search(r"#define PYV_CHUNK\s+\((\d+) \* 1024\)", header).group(1)) * 1024
    assert chunk % BLOCK == 0


# ------------------------------------------------------------------------------------- tables

def _c_errnos() -> list[tuple[str, int]]:
    text = (AGENT / "errnos.c").read_text()
    body = text[text.index("pyv_errnos[]"):]
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r'\{ "(E[A-Z0-9]+)", (\d+) \}', body)]


def test_errno_table_matches_c():
    c_table = _c_errnos()
    assert len(c_table) > 100
    assert c_table == list(ERRNOS)


def test_errno_table_matches_linux_numbers():
    # Python's errno module reflects the running (Linux x86_64) numbering for every name it knows.
    for name, num in ERRNOS:
        if hasattr(pyerrno, name):
            assert getattr(pyerrno, name) == num, name


def test_errno_lookups():
    assert errno_number("ENOENT") == 2
    assert errno_number("EWOULDBLOCK") == 11
    assert errno_name(11) == "EAGAIN"          # canonical name wins over the alias
    assert errno_name(0) == "OK"
    assert errno_name(9999) == "9999"
    with pytest.raises(KeyError):
        errno_number("ENOTANERRNO")


def _c_ops() -> dict[str, tuple[int, int]]:
    text = (AGENT / "ops.c").read_text()
    table = text[text.index("pyv_ops[] __initconst"):]
    max_args = int(re.search(r"#define PYV_MAX_ARGS\s+(\d+)", (AGENT / "agent.h").read_text()).group(1))
    out = {}
    for m in re.finditer(r'\{ "([a-z]+)",\s+(\d+), (\w+),', table):
        hi = max_args if m.group(3) == "PYV_MAX_ARGS" else int(m.group(3))
        out[m.group(1)] = (int(m.group(2)), hi)
    return out


def test_op_table_matches_c():
    assert _c_ops() == OPS


def test_spec_ops_all_present():
    spec_ops = ("echo exit sleep uptime cpus meminfo mount stat probe create write append read "
                "truncate fallocate mkdir rmdir unlink rename symlink readlink link chmod utime "
                "readdir setxattr getxattr listxattr statfs fsync mark").split()
    assert set(spec_ops) <= set(OPS)


def test_agent_makefile_lists_every_c_file():
    objs = set(re.findall(r"(\w+)\.o", (AGENT / "Makefile").read_text()))
    assert objs == {p.stem for p in AGENT.glob("*.c")}


# ------------------------------------------------------------------------------------- builders

def test_script_builder_text():
    s = (Script().op("mkdir", "/mnt/s/d").op("stat", "/mnt/s/x", "x10", expect="ENOENT")
         .op("write", "/mnt/s/f", 4096, 7).op("rename", "/a", "/b", expect=17))
    assert s.text() == ("mkdir /mnt/s/d\nstat /mnt/s/x x10 expect=ENOENT\n"
                        "write /mnt/s/f 4096 7\nrename /a /b expect=EEXIST\n")


@pytest.mark.parametrize("bad", [
    lambda: Script().op("nosuchop"),
    lambda: Script().op("mkdir"),
    lambda: Script().op("mkdir", "/a", "/b"),
    lambda: Script().op("mkdir", "/a b"),
    lambda: Script().op("mkdir", ""),
    lambda: Script().op("mkdir", "/a\n"),
    lambda: Script().op("mkdir", "/a", expect="EWHAT"),
    lambda: Script().op("mkdir", "/a", expect=99999),
])
def test_script_builder_rejects(bad):
    with pytest.raises(ScriptError):
        bad()


def test_render_forms():
    text = render(["mkdir /x", ("stat", "/y", "expect=ENOENT"), Step("exit", ("0",)), ""])
    assert text == "mkdir /x\nstat /y expect=ENOENT\nexit 0\n"
    with pytest.raises(ScriptError):
        render(["probe /d 1"])


def test_sum64_is_block_weighted_and_offset_aware():
    from guest.script import sum64
    block = (1).to_bytes(8, "little") * 512                 # one 4 KiB block of words = 1
    assert sum64(block) == 512
    assert sum64(block * 2) == 512 * 1 + 512 * 2            # the second block weighs 2
    assert sum64(bytes(4096) + block) != sum64(block + bytes(4096))   # offsets matter
    assert sum64(b"\x01\x02\x03") == 0x030201               # a short tail is zero-padded
    data = bytes(range(256)) * 40
    # chunks read at block-aligned offsets compose, as the agent's 128 KiB reads do
    assert sum64(data) == (sum64(data[:4096]) + sum64(data[4096:], offset=4096)) % 2**64
