"""The seccomp compiler, run through a small classic-BPF interpreter written here.

The kernel is the real judge (tests/test_jail.py installs these programs and makes the calls);
the interpreter lets us ask about *every* syscall number, foreign architectures and random
policies, which a live process cannot do without dying.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.jail import policy, seccomp
from devices.jail.syscall_table import MAX_KNOWN, SYSCALLS

AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
EPERM = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
ALLOW = seccomp.SECCOMP_RET_ALLOW


def run_bpf(prog: list[seccomp.Insn], nr: int, arch: int = seccomp.AUDIT_ARCH_X86_64,
            args: tuple[int, ...] = (0,) * 6) -> int:
    """Execute a classic BPF seccomp program on one seccomp_data; returns the RET value."""
    data = struct.pack("<IIQ6Q", nr & 0xFFFFFFFF, arch, 0, *args)
    a, pc, steps = 0, 0, 0
    while True:
        code, jt, jf, k = prog[pc]          # IndexError = a path that falls off the end
        pc += 1
        steps += 1
        assert steps <= len(prog), "a loop (classic BPF only jumps forward)"
        if code == seccomp.BPF_LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= len(data)
            a = struct.unpack_from("<I", data, k)[0]
        elif code == seccomp.BPF_ALU_AND_K:
            a &= k
        elif code == seccomp.BPF_JMP_JA:
            pc += k
        elif code in (seccomp.BPF_JMP_JEQ_K, seccomp.BPF_JMP_JGT_K, seccomp.BPF_JMP_JGE_K,
                      seccomp.BPF_JMP_JSET_K):
            cond = {seccomp.BPF_JMP_JEQ_K: a == k, seccomp.BPF_JMP_JGT_K: a > k,
                    seccomp.BPF_JMP_JGE_K: a >= k, seccomp.BPF_JMP_JSET_K: bool(a & k)}[code]
            pc += jt if cond else jf
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unknown BPF opcode {code:#x}")


@pytest.fixture(scope="module")
def fs_prog() -> list[seccomp.Insn]:
    return seccomp.compile_filter(seccomp.rules_by_number(policy.FS_DEVICE), EPERM)


def _expected(name: str | None, default: int) -> int:
    if name is None or name not in policy.FS_DEVICE:
        return default
    rule = policy.FS_DEVICE[name]
    if rule is None:
        return ALLOW
    if isinstance(rule, seccomp.Errno):
        return seccomp.SECCOMP_RET_ERRNO | rule.errno
    # argument rules, evaluated with all-zero arguments (checked in detail separately)
    if isinstance(rule, seccomp.ArgIn) and 0 in rule.values:
        return ALLOW
    if isinstance(rule, seccomp.ArgMaskEq) and rule.value & rule.mask == 0:
        return ALLOW
    return default


def test_every_syscall_number_gets_the_policy_answer(fs_prog):
    by_nr = {nr: name for name, nr in SYSCALLS.items()}
    allowed = 0
    for nr in range(MAX_KNOWN + 1):
        got = run_bpf(fs_prog, nr)
        assert got == _expected(by_nr.get(nr), EPERM), by_nr.get(nr, nr)
        allowed += got == ALLOW
    # every plain entry, and nothing else, is allowed (argument rules as for zero arguments)
    assert allowed == sum(1 for name in policy.FS_DEVICE if _expected(name, EPERM) == ALLOW)


def test_numbers_beyond_the_table_get_enosys_and_x32_gets_the_default(fs_prog):
    for nr in (MAX_KNOWN + 1, 451, 1000, 0x3FFFFFFF):
        assert run_bpf(fs_prog, nr) == ENOSYS
    for name in ("read", "write", "openat", "futex"):            # allowed as x86_64 calls
        assert run_bpf(fs_prog, SYSCALLS[name]) == ALLOW
        assert run_bpf(fs_prog, SYSCALLS[name] | seccomp.X32_SYSCALL_BIT) == EPERM
    assert run_bpf(fs_prog, 0xFFFFFFFF) == EPERM                 # nr -1 has the x32 bit too


@pytest.mark.parametrize("arch", [AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64, 0])
def test_foreign_architecture_is_killed_whatever_the_number(fs_prog, arch):
    for nr in (0, 1, 39, SYSCALLS["socket"], MAX_KNOWN + 1):
        assert run_bpf(fs_prog, nr, arch=arch) == seccomp.SECCOMP_RET_KILL_PROCESS
    assert run_bpf(fs_prog, 0) == ALLOW                         # control: x86_64 read


def test_clone_only_for_threads(fs_prog):
    nr = SYSCALLS["clone"]
    glibc_thread = 0x3D0F00      # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    assert run_bpf(fs_prog, nr, args=(glibc_thread, 0, 0, 0, 0, 0)) == ALLOW
    assert run_bpf(fs_prog, nr, args=(glibc_thread | 0xFFFFFFFF00000000, 0, 0, 0, 0, 0)) == ALLOW
    fork = 0x01200011            # glibc fork: CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD
    assert run_bpf(fs_prog, nr, args=(fork, 0, 0, 0, 0, 0)) == EPERM
    assert run_bpf(fs_prog, nr, args=(glibc_thread & ~policy.CLONE_THREAD, 0, 0, 0, 0, 0)) == EPERM
    assert run_bpf(fs_prog, SYSCALLS["clone3"]) == ENOSYS


def test_ioctl_only_listed_requests(fs_prog):
    nr = SYSCALLS["ioctl"]
    for req in (policy.TCGETS, policy.FIONBIO, policy.FIOCLEX, policy.FIONCLEX):
        assert run_bpf(fs_prog, nr, args=(3, req, 0, 0, 0, 0)) == ALLOW
    for req in (policy.TIOCSTI, policy.FIONREAD, 0, 0xC0189436):   # ... and BTRFS_IOC_* etc.
        assert run_bpf(fs_prog, nr, args=(3, req, 0, 0, 0, 0)) == EPERM


def test_prlimit64_only_for_this_process(fs_prog):
    nr = SYSCALLS["prlimit64"]
    assert run_bpf(fs_prog, nr, args=(0, 7, 0, 0, 0, 0)) == ALLOW       # pid 0: itself
    assert run_bpf(fs_prog, nr, args=(1, 7, 0, 0, 0, 0)) == EPERM       # anyone else: refused


@pytest.mark.parametrize("action", sorted(seccomp.ACTIONS))
def test_default_action_is_configurable(action):
    default = seccomp.ACTIONS[action]
    prog = seccomp.compile_filter(seccomp.rules_by_number(policy.FS_DEVICE), default)
    assert run_bpf(prog, SYSCALLS["socket"]) == default
    assert run_bpf(prog, SYSCALLS["execve"]) == default
    assert run_bpf(prog, SYSCALLS["read"]) == ALLOW


def test_program_shape(fs_prog):
    assert len(fs_prog) <= seccomp.BPF_MAXINSNS
    for i, (code, jt, jf, k) in enumerate(fs_prog):
        if code in (seccomp.BPF_JMP_JEQ_K, seccomp.BPF_JMP_JGT_K, seccomp.BPF_JMP_JGE_K,
                    seccomp.BPF_JMP_JSET_K):
            assert i + 1 + max(jt, jf) < len(fs_prog)
        if code == seccomp.BPF_JMP_JA:
            assert i + 1 + k < len(fs_prog)
    assert fs_prog[-1][0] == seccomp.BPF_RET_K


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, MAX_KNOWN),
                       st.sampled_from([None, seccomp.Errno(errno.EACCES),
                                        seccomp.ArgMaskEq(2, 0xF0, 0x30),
                                        seccomp.ArgIn(1, (7, 9, 11))]),
                       max_size=300),
       st.lists(st.integers(0, MAX_KNOWN), min_size=1, max_size=20))
def test_random_policies_compile_to_exact_membership(rules, probes):
    prog = seccomp.compile_filter(rules, EPERM)
    for nr in probes + list(rules)[:20]:
        rule = rules.get(nr)
        if nr not in rules:
            assert run_bpf(prog, nr) == EPERM
        elif rule is None:
            assert run_bpf(prog, nr) == ALLOW
        elif isinstance(rule, seccomp.Errno):
            assert run_bpf(prog, nr) == seccomp.SECCOMP_RET_ERRNO | errno.EACCES
        elif isinstance(rule, seccomp.ArgMaskEq):
            assert run_bpf(prog, nr, args=(0, 0, 0x1234_5639, 0, 0, 0)) == ALLOW
            assert run_bpf(prog, nr, args=(0, 0, 0x1234_5649, 0, 0, 0)) == EPERM
        else:
            for v in (7, 9, 11):
                assert run_bpf(prog, nr, args=(0, v, 0, 0, 0, 0)) == ALLOW
            assert run_bpf(prog, nr, args=(0, 8, 0, 0, 0, 0)) == EPERM


def test_unknown_names_and_numbers_are_refused():
    with pytest.raises(ValueError, match="unknown x86_64 system call"):
        seccomp.rules_by_number({"read": None, "frobnicate": None})
    with pytest.raises(ValueError, match="outside the table"):
        seccomp.compile_filter({MAX_KNOWN + 1: None}, EPERM)


def test_policy_names_are_all_known_and_listed_once():
    for name in list(policy.FS_DEVICE) + list(policy.NEVER):
        assert name in SYSCALLS, name
    names = [n for g in policy.GROUPS for n in g.calls]
    assert len(names) == len(set(names)) == len(policy.FS_DEVICE)
    assert all(g.why for g in policy.GROUPS)
