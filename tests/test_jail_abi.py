"""Every number devices/jail hands the kernel equals the C header's value (a gcc-compiled probe),
and the generated syscall table is current."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devices.jail import _sys, capabilities, gen_syscall_table, namespaces, policy, seccomp
from devices.jail.syscall_table import MAX_KNOWN, SYSCALLS

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is required for the C probe")

REPO = Path(__file__).resolve().parents[1]

HEADERS = ["sys/mount.h", "sys/ioctl.h", "sched.h", "sys/prctl.h", "linux/capability.h",
           "linux/securebits.h", "linux/seccomp.h", "linux/audit.h", "linux/filter.h",
           "stddef.h", "stdio.h", "asm/unistd.h"]


def _facts() -> dict[str, tuple[int, str]]:
    """name -> (our value, C expression)."""
    f: dict[str, tuple[int, str]] = {}
    for name, nr in SYSCALLS.items():
        f[f"nr:{name}"] = (nr, f"__NR_{name}")
    for name, bit in capabilities.CAPS.items():
        f[f"cap:{name}"] = (bit, f"CAP_{name}")
    for name in ("SECBIT_NOROOT", "SECBIT_NOROOT_LOCKED", "SECBIT_NO_SETUID_FIXUP",
                 "SECBIT_NO_SETUID_FIXUP_LOCKED", "SECBIT_KEEP_CAPS", "SECBIT_KEEP_CAPS_LOCKED",
                 "SECBIT_NO_CAP_AMBIENT_RAISE", "SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED"):
        f[name] = (getattr(capabilities, name), name)
    f["_LINUX_CAPABILITY_VERSION_3"] = (capabilities._LINUX_CAPABILITY_VERSION_3,
                                        "_LINUX_CAPABILITY_VERSION_3")
    f["SYS_capget"] = (capabilities.SYS_capget, "__NR_capget")
    f["SYS_capset"] = (capabilities.SYS_capset, "__NR_capset")
    for name in dir(_sys):
        if name.startswith("PR_"):
            f[name] = (getattr(_sys, name), name)
    for name in ("CLONE_NEWNS", "CLONE_NEWCGROUP", "CLONE_NEWUTS", "CLONE_NEWIPC",
                 "CLONE_NEWUSER", "CLONE_NEWPID", "CLONE_NEWNET", "MS_RDONLY", "MS_NOSUID",
                 "MS_NODEV", "MS_NOEXEC", "MS_REMOUNT", "MS_NOATIME", "MS_NODIRATIME", "MS_BIND",
                 "MS_REC", "MS_PRIVATE", "MS_SLAVE", "MS_RELATIME", "MS_STRICTATIME",
                 "MNT_DETACH"):
        f[name] = (getattr(namespaces, name), name)
    f["SYS_pivot_root"] = (namespaces.SYS_pivot_root, "__NR_pivot_root")
    for name in ("BPF_LD_W_ABS", "BPF_ALU_AND_K", "BPF_JMP_JA", "BPF_JMP_JEQ_K", "BPF_JMP_JGT_K",
                 "BPF_JMP_JGE_K", "BPF_JMP_JSET_K", "BPF_RET_K"):
        parts = name.split("_")[1:]
        f[name] = (getattr(seccomp, name), "(" + "|".join(f"BPF_{p}" for p in parts) + ")")
    f["BPF_MAXINSNS"] = (seccomp.BPF_MAXINSNS, "BPF_MAXINSNS")
    for name in ("SECCOMP_SET_MODE_FILTER", "SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_MODE_FILTER",
                 "SECCOMP_RET_KILL_PROCESS", "SECCOMP_RET_KILL_THREAD", "SECCOMP_RET_TRAP",
                 "SECCOMP_RET_ERRNO", "SECCOMP_RET_LOG", "SECCOMP_RET_ALLOW", "SECCOMP_RET_DATA",
                 "AUDIT_ARCH_X86_64"):
        f[name] = (getattr(seccomp, name), name)
    f["X32_SYSCALL_BIT"] = (seccomp.X32_SYSCALL_BIT, "__X32_SYSCALL_BIT")
    f["SYS_seccomp"] = (seccomp.SYS_seccomp, "__NR_seccomp")
    f["OFF_NR"] = (seccomp.OFF_NR, "offsetof(struct seccomp_data, nr)")
    f["OFF_ARCH"] = (seccomp.OFF_ARCH, "offsetof(struct seccomp_data, arch)")
    f["OFF_IP"] = (seccomp.OFF_IP, "offsetof(struct seccomp_data, instruction_pointer)")
    for i in range(6):
        f[f"off_arg{i}"] = (seccomp.off_arg(i), f"offsetof(struct seccomp_data, args[{i}])")
    f["sizeof_sock_filter"] = (ctypes.sizeof(seccomp.SockFilter), "sizeof(struct sock_filter)")
    f["sizeof_sock_fprog"] = (ctypes.sizeof(seccomp.SockFprog), "sizeof(struct sock_fprog)")
    for name in ("CLONE_VM", "CLONE_SIGHAND", "CLONE_THREAD", "TCGETS", "FIONBIO", "FIONCLEX",
                 "FIOCLEX", "FIONREAD", "TIOCSTI"):
        f[name] = (getattr(policy, name), name)
    return f


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict[str, int]:
    facts = _facts()
    lines = ["#define _GNU_SOURCE"] + [f"#include <{h}>" for h in HEADERS]
    lines.append("int main(void) {")
    for key, (_v, expr) in facts.items():
        lines.append(f'  printf("%s %llu\\n", "{key}", (unsigned long long)({expr}));')
    lines.append("  return 0;\n}")
    d = tmp_path_factory.mktemp("jailprobe")
    (d / "probe.c").write_text("\n".join(lines) + "\n")
    cc = subprocess.run(["gcc", "-O0", "-w", "-o", str(d / "probe"), str(d / "probe.c")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, f"probe does not compile:\n{cc.stderr[:3000]}"
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_every_number_matches_the_headers(c_values):
    facts = _facts()
    wrong = {k: (v, c_values[k]) for k, (v, _e) in facts.items() if v != c_values[k]}
    assert not wrong, wrong
    assert len(c_values) == len(facts) > 450


def test_the_table_covers_the_header():
    header = gen_syscall_table.read_header()
    assert header == SYSCALLS and MAX_KNOWN == max(header.values())


def test_regenerating_gives_identical_file():
    text = gen_syscall_table.render(gen_syscall_table.read_header(),
                                    gen_syscall_table.kernel_headers_version())
    assert text == gen_syscall_table.OUTPUT.read_text(), "run: python -m devices.jail.gen_syscall_table"
    assert text.splitlines()[0].startswith("# Generated by devices/jail/gen_syscall_table.py")


def test_check_mode():
    ok = subprocess.run([sys.executable, "-m", "devices.jail.gen_syscall_table", "--check"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_last_cap_probe_agrees_with_the_kernel():
    # drop_to() walks 0..last_cap() for the bounding set, so a capability newer than our table
    # is dropped too; the probe must find exactly the kernel's last one.
    assert capabilities.last_cap() == int(Path("/proc/sys/kernel/cap_last_cap").read_text())
