"""Host side of the guest agent's script language: building scripts and checking their results.

The in-kernel agent (guest/agent/) runs one op per line (see the spec, "Guest agent protocol").
This module is its host-side mirror:

- `pattern(size, seed, offset)` computes the exact bytes the agent's `write`/`append` produce, so a
  test can compare a file on the host byte for byte (or by `zlib.crc32` with the agent's `read`).
- `OPS` (name -> (min_args, max_args)) mirrors the agent's op table and `ERRNOS` its errno table;
  tests/test_guest_script.py parses the C sources and fails if either drifts.
- `Script` / `render()` build script text and reject, on the host, lines the agent would refuse
  (so a typo fails fast with a Python traceback instead of a 20-second boot and an error line).

Why this pattern: guest kernel code runs ~1000x slower than native on kvm_pvm, so the agent must
not spend per-byte work generating data. It computes one 4 KiB block from the seed (splitmix64)
and reuses it, changing only the first 8 bytes of each block (the base word XOR block_index *
golden ratio), which keeps every block distinct so misplaced or repeated blocks are detected.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["BLOCK", "pattern", "sum64", "OPS", "ERRNOS", "errno_number", "errno_name", "Step", "Script",
           "render", "ScriptError"]

BLOCK = 4096
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + _GOLDEN) & _MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return state, z ^ (z >> 31)


@functools.lru_cache(maxsize=32)
def _base_block(seed: int) -> bytes:
    out = bytearray()
    state = seed & _MASK
    for _ in range(BLOCK // 8):
        state, v = _splitmix64(state)
        out += v.to_bytes(8, "little")
    return bytes(out)


def pattern(size: int, seed: int = 0, offset: int = 0) -> bytes:
    """Bytes [offset, offset+size) of the stream the agent writes for `seed`.

    `write PATH SIZE SEED` leaves exactly `pattern(SIZE, SEED)` in the file; `append PATH SIZE
    SEED` appends exactly the same bytes (the pattern restarts at 0 for every op).
    """
    if size < 0 or offset < 0:
        raise ValueError("size and offset must be >= 0")
    if not 0 <= seed <= _MASK:
        raise ValueError("seed must fit in 64 bits unsigned")
    if size == 0:
        return b""
    first = offset // BLOCK
    nblocks = (offset + size - 1) // BLOCK - first + 1
    base = _base_block(seed)
    word0 = int.from_bytes(base[:8], "little")
    buf = bytearray(base * nblocks)
    for i in range(nblocks):
        v = (word0 ^ ((first + i) * _GOLDEN)) & _MASK
        buf[i * BLOCK:i * BLOCK + 8] = v.to_bytes(8, "little")
    start = offset - first * BLOCK
    return bytes(buf[start:start + size])


def sum64(data: bytes, offset: int = 0) -> int:
    """The agent's ``read PATH sum64`` checksum of ``data`` found at file ``offset``: for each
    4 KiB block b of the file, (b + 1) * (the sum of its little-endian u64 words, a short tail
    zero-padded), all mod 2**64. About 5x cheaper than CRC-32 in an emulated guest, and the block
    weight still catches data served at the wrong offset."""
    import array

    total = 0
    pos = 0
    while pos < len(data):
        block = (offset + pos) // BLOCK
        end = min(len(data), pos + BLOCK - (offset + pos) % BLOCK)
        chunk = data[pos:end]
        if len(chunk) % 8:
            chunk += bytes(8 - len(chunk) % 8)
        words = array.array("Q")
        words.frombytes(chunk)
        total += (block + 1) * sum(words)
        pos = end
    return total & _MASK


# name -> (min_args, max_args), not counting a final expect=ERRNO. Mirrors pyv_ops[] in
# guest/agent/ops.c (checked by a test).
OPS: dict[str, tuple[int, int]] = {
    "echo": (0, 16), "exit": (1, 1), "poweroff": (0, 1), "sleep": (1, 1), "uptime": (0, 0), "cpus": (0, 0),
    "meminfo": (0, 0), "mark": (1, 1), "mount": (2, 3), "stat": (1, 2), "probe": (3, 3),
    "create": (1, 1), "write": (2, 3), "append": (2, 3), "overwrite": (2, 3), "read": (1, 2), "truncate": (2, 2),
    "fallocate": (3, 4), "mkdir": (1, 1), "rmdir": (1, 1), "unlink": (1, 1), "rename": (2, 3),
    "symlink": (2, 2), "readlink": (1, 1), "link": (2, 2), "chmod": (2, 2), "utime": (3, 3),
    "readdir": (1, 1), "setxattr": (3, 4), "getxattr": (2, 2), "listxattr": (1, 1),
    "statfs": (1, 1), "fsync": (1, 1), "sync": (0, 0), "parallel": (2, 16),
    "ttyread": (2, 2),
}

# (name, number), Linux asm-generic numbering; aliases follow their canonical name. Mirrors
# pyv_errnos[] in guest/agent/errnos.c (checked by a test).
ERRNOS: tuple[tuple[str, int], ...] = (
    ("EPERM", 1), ("ENOENT", 2), ("ESRCH", 3), ("EINTR", 4), ("EIO", 5), ("ENXIO", 6),
    ("E2BIG", 7), ("ENOEXEC", 8), ("EBADF", 9), ("ECHILD", 10), ("EAGAIN", 11), ("ENOMEM", 12),
    ("EACCES", 13), ("EFAULT", 14), ("ENOTBLK", 15), ("EBUSY", 16), ("EEXIST", 17), ("EXDEV", 18),
    ("ENODEV", 19), ("ENOTDIR", 20), ("EISDIR", 21), ("EINVAL", 22), ("ENFILE", 23),
    ("EMFILE", 24), ("ENOTTY", 25), ("ETXTBSY", 26), ("EFBIG", 27), ("ENOSPC", 28), ("ESPIPE", 29),
    ("EROFS", 30), ("EMLINK", 31), ("EPIPE", 32), ("EDOM", 33), ("ERANGE", 34), ("EDEADLK", 35),
    ("ENAMETOOLONG", 36), ("ENOLCK", 37), ("ENOSYS", 38), ("ENOTEMPTY", 39), ("ELOOP", 40),
    ("EWOULDBLOCK", 11), ("ENOMSG", 42), ("EIDRM", 43), ("ECHRNG", 44), ("EL2NSYNC", 45),
    ("EL3HLT", 46), ("EL3RST", 47), ("ELNRNG", 48), ("EUNATCH", 49), ("ENOCSI", 50),
    ("EL2HLT", 51), ("EBADE", 52), ("EBADR", 53), ("EXFULL", 54), ("ENOANO", 55), ("EBADRQC", 56),
    ("EBADSLT", 57), ("EDEADLOCK", 35), ("EBFONT", 59), ("ENOSTR", 60), ("ENODATA", 61),
    ("ETIME", 62), ("ENOSR", 63), ("ENONET", 64), ("ENOPKG", 65), ("EREMOTE", 66), ("ENOLINK", 67),
    ("EADV", 68), ("ESRMNT", 69), ("ECOMM", 70), ("EPROTO", 71), ("EMULTIHOP", 72),
    ("EDOTDOT", 73), ("EBADMSG", 74), ("EOVERFLOW", 75), ("ENOTUNIQ", 76), ("EBADFD", 77),
    ("EREMCHG", 78), ("ELIBACC", 79), ("ELIBBAD", 80), ("ELIBSCN", 81), ("ELIBMAX", 82),
    ("ELIBEXEC", 83), ("EILSEQ", 84), ("ERESTART", 85), ("ESTRPIPE", 86), ("EUSERS", 87),
    ("ENOTSOCK", 88), ("EDESTADDRREQ", 89), ("EMSGSIZE", 90), ("EPROTOTYPE", 91),
    ("ENOPROTOOPT", 92), ("EPROTONOSUPPORT", 93), ("ESOCKTNOSUPPORT", 94), ("EOPNOTSUPP", 95),
    ("ENOTSUP", 95), ("EPFNOSUPPORT", 96), ("EAFNOSUPPORT", 97), ("EADDRINUSE", 98),
    ("EADDRNOTAVAIL", 99), ("ENETDOWN", 100), ("ENETUNREACH", 101), ("ENETRESET", 102),
    ("ECONNABORTED", 103), ("ECONNRESET", 104), ("ENOBUFS", 105), ("EISCONN", 106),
    ("ENOTCONN", 107), ("ESHUTDOWN", 108), ("ETOOMANYREFS", 109), ("ETIMEDOUT", 110),
    ("ECONNREFUSED", 111), ("EHOSTDOWN", 112), ("EHOSTUNREACH", 113), ("EALREADY", 114),
    ("EINPROGRESS", 115), ("ESTALE", 116), ("EUCLEAN", 117), ("ENOTNAM", 118), ("ENAVAIL", 119),
    ("EISNAM", 120), ("EREMOTEIO", 121), ("EDQUOT", 122), ("ENOMEDIUM", 123), ("EMEDIUMTYPE", 124),
    ("ECANCELED", 125), ("ENOKEY", 126), ("EKEYEXPIRED", 127), ("EKEYREVOKED", 128),
    ("EKEYREJECTED", 129), ("EOWNERDEAD", 130), ("ENOTRECOVERABLE", 131), ("ERFKILL", 132),
    ("EHWPOISON", 133), ("ENOTSUPP", 524),
)
_BY_NAME = {name: num for name, num in ERRNOS}
_BY_NUM: dict[int, str] = {}
for _name, _num in ERRNOS:
    _BY_NUM.setdefault(_num, _name)


def errno_number(name: str) -> int:
    """'ENOENT' -> 2. Raises KeyError for a name the agent would not accept."""
    return _BY_NAME[name]


def errno_name(num: int) -> str:
    """2 -> 'ENOENT'; 0 -> 'OK'; an unknown number -> its decimal string."""
    if num == 0:
        return "OK"
    return _BY_NUM.get(num, str(num))


class ScriptError(ValueError):
    """A step the agent would reject at parse time."""


def _token(value: object) -> str:
    tok = str(value)
    if not tok:
        raise ScriptError("empty argument")
    if any(c.isspace() or ord(c) < 0x20 for c in tok):
        raise ScriptError(f"argument {tok!r} contains whitespace or control characters")
    return tok


@dataclass(frozen=True)
class Step:
    op: str
    args: tuple[str, ...] = ()
    expect: str | None = None       # errno name, None = success

    def line(self) -> str:
        if self.op not in OPS:
            raise ScriptError(f"unknown op {self.op!r}")
        lo, hi = OPS[self.op]
        if not lo <= len(self.args) <= hi:
            raise ScriptError(f"{self.op} takes {lo}..{hi} arguments, got {len(self.args)}")
        parts = [self.op, *(_token(a) for a in self.args)]
        if self.expect is not None:
            if self.expect not in _BY_NAME:
                raise ScriptError(f"unknown errno name {self.expect!r}")
            parts.append(f"expect={self.expect}")
        return " ".join(parts)


def _expect_name(expect: str | int | None) -> str | None:
    if expect is None or expect == 0:
        return None
    if isinstance(expect, int):
        if expect not in _BY_NUM:
            raise ScriptError(f"unknown errno number {expect}")
        return _BY_NUM[expect]
    return expect


class Script:
    """Builder: `Script().op("mkdir", "/mnt/s/d").op("stat", "/mnt/s/x", expect="ENOENT").text()`.

    Step numbers printed by the agent count only ops (1-based, in order), and the VMM prepends one
    `mount` step per fs device, so `step_of(i)` is left to the caller that knows that prefix.
    """

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def op(self, name: str, *args: object, expect: str | int | None = None) -> Script:
        step = Step(name, tuple(_token(a) for a in args), _expect_name(expect))
        step.line()   # validate now, where the caller's traceback points at the mistake
        self.steps.append(step)
        return self

    def text(self) -> str:
        return "".join(s.line() + "\n" for s in self.steps)

    def __str__(self) -> str:
        return self.text()


def render(ops: Iterable[str | Sequence[object] | Step]) -> str:
    """Script text from steps given as Step, "op arg ..." strings or (op, arg, ...) sequences.

    A final `expect=NAME` element/word is honoured in the string and sequence forms.
    """
    script = Script()
    for item in ops:
        if isinstance(item, Step):
            item.line()
            script.steps.append(item)
            continue
        words = item.split() if isinstance(item, str) else [str(w) for w in item]
        if not words:
            continue
        expect = None
        if len(words) > 1 and words[-1].startswith("expect="):
            expect = words.pop()[len("expect="):]
        script.op(words[0], *words[1:], expect=expect)
    return script.text()
