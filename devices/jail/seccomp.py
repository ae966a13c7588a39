"""A seccomp-BPF allowlist compiler and installer (x86_64 only).

The program, in order:

1. ``seccomp_data.arch != AUDIT_ARCH_X86_64``: kill the process. A 64-bit Python never makes an
   i386 (``int 0x80``) system call; one that arrives anyway is an attack on a filter written
   for x86_64 numbers, whatever the configured action.
2. ``nr & 0x40000000`` (the x32 ABI bit): the default action. x32 numbers alias x86_64 ones and
   would otherwise slip past a filter that only lists x86_64 numbers.
3. ``nr > MAX_KNOWN``: ENOSYS. A call newer than our table (a newer libc trying ``fchmodat2``,
   say) then falls back to its older form, as it would on an older kernel, instead of failing
   with EPERM.
4. A binary search over the allowed numbers (contiguous ones merged into ranges), each leaf
   either allowing, answering a fixed errno (``clone3`` -> ENOSYS, so glibc uses ``clone``,
   whose flags a filter can see), or checking one argument (``clone`` only with thread flags,
   ``ioctl`` only with listed requests).
5. Anything else: the default action, ``SECCOMP_RET_ERRNO | EPERM`` (a stray call fails the
   one request), ``SECCOMP_RET_KILL_PROCESS`` (strict) or ``SECCOMP_RET_LOG`` (allow and log to
   the kernel audit log: for deriving a policy on a new host).

Arguments are checked on their low 32 bits only, which is exactly what the kernel uses for the
two we check (``ioctl``'s ``unsigned int cmd`` and ``clone``'s flags).

The filter is installed with ``seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC)``, so
every thread of the process is covered, and requires no_new_privs (or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Mapping
from dataclasses import dataclass

from . import _sys
from .syscall_table import MAX_KNOWN, SYSCALLS

# linux/filter.h classic BPF opcodes
BPF_LD_W_ABS = 0x20      # BPF_LD | BPF_W | BPF_ABS: A = *(u32 *)(data + k)
BPF_ALU_AND_K = 0x54     # BPF_ALU | BPF_AND | BPF_K: A &= k
BPF_JMP_JA = 0x05        # BPF_JMP | BPF_JA: pc += k
BPF_JMP_JEQ_K = 0x15
BPF_JMP_JGT_K = 0x25
BPF_JMP_JGE_K = 0x35
BPF_JMP_JSET_K = 0x45
BPF_RET_K = 0x06
BPF_MAXINSNS = 4096

# linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SYS_seccomp = 317

# struct seccomp_data offsets
OFF_NR = 0
OFF_ARCH = 4
OFF_IP = 8


def off_arg(i: int) -> int:
    """Offset of the low 32 bits of argument i (little endian)."""
    if not 0 <= i < 6:
        raise ValueError(f"syscall argument index {i} out of range")
    return 16 + 8 * i


#: Configurable default actions (JailSpec.seccomp_action).
ACTIONS = {
    "errno": SECCOMP_RET_ERRNO | errno.EPERM,
    "kill": SECCOMP_RET_KILL_PROCESS,
    "log": SECCOMP_RET_LOG,
}


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


Insn = tuple[int, int, int, int]   # code, jt, jf, k


def stmt(code: int, k: int) -> Insn:
    return (code, 0, 0, k & 0xFFFFFFFF)


def jump(code: int, k: int, jt: int, jf: int) -> Insn:
    if not (0 <= jt <= 255 and 0 <= jf <= 255):
        raise ValueError(f"BPF jump offset out of range ({jt}, {jf})")
    return (code, jt, jf, k & 0xFFFFFFFF)


# ---------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Errno:
    """Answer this errno without running the call (e.g. ENOSYS for clone3)."""
    errno: int


@dataclass(frozen=True)
class ArgMaskEq:
    """Allow only if ``(arg & mask) == value`` (low 32 bits)."""
    arg: int
    mask: int
    value: int
    why: str = ""


@dataclass(frozen=True)
class ArgIn:
    """Allow only if the argument (low 32 bits) is one of `values`."""
    arg: int
    values: tuple[int, ...]
    why: str = ""


Rule = Errno | ArgMaskEq | ArgIn | None   # None = allow


def _rule_code(rule: Rule, default: int) -> list[Insn]:
    """Code that ends in a RET on every path (A holds the syscall number on entry)."""
    if rule is None:
        return [stmt(BPF_RET_K, SECCOMP_RET_ALLOW)]
    if isinstance(rule, Errno):
        return [stmt(BPF_RET_K, SECCOMP_RET_ERRNO | (rule.errno & SECCOMP_RET_DATA))]
    if isinstance(rule, ArgMaskEq):
        return [stmt(BPF_LD_W_ABS, off_arg(rule.arg)),
                stmt(BPF_ALU_AND_K, rule.mask),
                jump(BPF_JMP_JEQ_K, rule.value & rule.mask, 0, 1),
                stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
                stmt(BPF_RET_K, default)]
    if isinstance(rule, ArgIn):
        n = len(rule.values)
        if not 0 < n < 250:
            raise ValueError("ArgIn needs 1..249 values")
        code = [stmt(BPF_LD_W_ABS, off_arg(rule.arg))]
        for i, v in enumerate(rule.values):
            # match -> skip the remaining compares and the RET default, landing on RET ALLOW
            code.append(jump(BPF_JMP_JEQ_K, v, n - i, 0))
        code += [stmt(BPF_RET_K, default), stmt(BPF_RET_K, SECCOMP_RET_ALLOW)]
        return code
    raise TypeError(f"unknown rule {rule!r}")


Segment = tuple[int, int, Rule]   # [lo, hi] inclusive, rule for every number in it


def _segments(rules: dict[int, Rule]) -> list[Segment]:
    """Sorted segments; contiguous plainly-allowed numbers merge into one range."""
    segs: list[Segment] = []
    for nr in sorted(rules):
        rule = rules[nr]
        if rule is None and segs and segs[-1][2] is None and segs[-1][1] == nr - 1:
            segs[-1] = (segs[-1][0], nr, None)
        else:
            segs.append((nr, nr, rule))
    return segs


def _search(segs: list[Segment], default: int) -> list[Insn]:
    """Binary search over segments with A = syscall number; every path ends in a RET.

    Inner nodes are ``JGE k ? (JA over the left half) : left half`` so no conditional jump ever
    spans more than a leaf (classic BPF conditional offsets are 8 bits); leaves are tiny."""
    if not segs:
        return [stmt(BPF_RET_K, default)]
    if len(segs) == 1:
        lo, hi, rule = segs[0]
        rc = _rule_code(rule, default)
        if lo == hi:
            return [jump(BPF_JMP_JEQ_K, lo, 0, len(rc))] + rc + [stmt(BPF_RET_K, default)]
        return ([jump(BPF_JMP_JGE_K, lo, 0, len(rc) + 1),
                 jump(BPF_JMP_JGT_K, hi, len(rc), 0)]
                + rc + [stmt(BPF_RET_K, default)])
    mid = len(segs) // 2
    left = _search(segs[:mid], default)
    right = _search(segs[mid:], default)
    return [jump(BPF_JMP_JGE_K, segs[mid][0], 0, 1), stmt(BPF_JMP_JA, len(left))] + left + right


def compile_filter(rules: dict[int, Rule], default: int) -> list[Insn]:
    """The whole program (see the module docstring) for syscall number -> rule."""
    for nr in rules:
        if not 0 <= nr <= MAX_KNOWN:
            raise ValueError(f"syscall number {nr} outside the table")
    prog = [
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
        jump(BPF_JMP_JSET_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, default),
        jump(BPF_JMP_JGT_K, MAX_KNOWN, 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
    ]
    prog += _search(_segments(rules), default)
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp program too long ({len(prog)} instructions)")
    return prog


def rules_by_number(allowed: Mapping[str, Rule]) -> dict[int, Rule]:
    """Syscall names -> numbers (an unknown name is a ValueError: a typo must not pass)."""
    out: dict[int, Rule] = {}
    for name, rule in allowed.items():
        if name not in SYSCALLS:
            raise ValueError(f"unknown x86_64 system call {name!r}")
        out[SYSCALLS[name]] = rule
    return out


def install(prog: list[Insn]) -> None:
    """Install `prog` on every thread of the process (TSYNC). Needs no_new_privs."""
    arr = (SockFilter * len(prog))(*[SockFilter(*insn) for insn in prog])
    fprog = SockFprog(len(prog), arr)
    r = _sys.libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                          ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if r < 0:
        _sys.raise_errno("seccomp(SECCOMP_SET_MODE_FILTER)")
    if r > 0:
        raise OSError(errno.EBUSY, f"seccomp TSYNC: thread {r} could not be synchronised")


def mode() -> int:
    """0 = off, 2 = filter (PR_GET_SECCOMP)."""
    return _sys.prctl(_sys.PR_GET_SECCOMP)
