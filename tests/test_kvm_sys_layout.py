"""Every generated struct/union agrees with gcc on sizeof and on every field's offset and size,
and every generated constant (ioctl numbers included) equals the C macro's value."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from kvm_sys import bindings as kb



@pytest.fixture(autouse=True)
def _gcc() -> None:
    # .ci/setup.sh installs gcc (build-essential): missing means a broken set-up, not a skip.
    assert shutil.which("gcc"), "gcc missing: run .ci/setup.sh (build-essential)"


def _walk(cls: type, prefix: str, base: int):
    """(C member designator, offset, size) for every field, through nested and anonymous members."""
    anon = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, *bits in cls._fields_:
        desc = getattr(cls, name)
        off = base + desc.offset
        if name in anon:
            yield from _walk(ftype, prefix, off)          # C: members of an anonymous member are direct
            continue
        path = f"{prefix}{name}"
        if bits:
            continue                                      # bitfields: no offsetof; sizeof covers them
        if issubclass(ftype, ctypes.Array) and ftype._length_ == 0:
            # Flexible array (T x[] / T x[0]): C cannot sizeof `x[]`; compare the element instead.
            yield path + "[0]", off, ctypes.sizeof(ftype._type_)
            continue
        yield path, off, ctypes.sizeof(ftype)
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            yield from _walk(ftype, path + ".", off)


def _members():
    rows = []
    for cname, cls in kb.TAGGED_TYPES.items():
        rows.append((cname, None, 0, ctypes.sizeof(cls)))
        for path, off, size in _walk(cls, "", 0):
            rows.append((cname, path, off, size))
    return rows


def _constants() -> dict[str, int]:
    return {n: v for n, v in vars(kb).items()
            if n.isupper() and isinstance(v, int) and not isinstance(v, bool)
            and n != "KERNEL_HEADERS_VERSION"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    rows = _members()
    consts = _constants()
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for i, (cname, path, _off, _size) in enumerate(rows):
        if path is None:
            lines.append(f'  printf("S {i} %zu 0\\n", sizeof({cname}));')
        else:
            lines.append(f'  printf("S {i} %zu %zu\\n", offsetof({cname}, {path}), '
                         f'sizeof((({cname} *)0)->{path}));')
    for name in consts:
        lines.append(f'  printf("C {name} %llu\\n", (unsigned long long)({name}));')
    lines.append("  return 0;\n}")
    d = tmp_path_factory.mktemp("kvmprobe")
    (d / "probe.c").write_text("\n".join(lines) + "\n")
    cc = subprocess.run(["gcc", "-O0", "-w", "-o", str(d / "probe"), str(d / "probe.c")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, f"probe does not compile:\n{cc.stderr[:3000]}"
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    members, cvals = {}, {}
    for line in out.splitlines():
        kind, key, *vals = line.split()
        if kind == "S":
            members[int(key)] = (int(vals[0]), int(vals[1]))
        else:
            cvals[key] = int(vals[0])
    return rows, members, consts, cvals


def test_probe_covers_many_types(probe):
    rows, members, _c, _cv = probe
    assert len(kb.TAGGED_TYPES) > 120
    assert len(members) == len(rows) > 1500


def test_struct_sizes_match_gcc(probe):
    rows, members, _c, _cv = probe
    bad = [(c, members[i][0], s) for i, (c, p, _o, s) in enumerate(rows) if p is None and members[i][0] != s]
    assert not bad, f"sizeof mismatches (name, gcc, ctypes): {bad[:10]}"


def test_field_offsets_and_sizes_match_gcc(probe):
    rows, members, _c, _cv = probe
    bad = [(c, p, members[i], (o, s)) for i, (c, p, o, s) in enumerate(rows)
           if p is not None and members[i] != (o, s)]
    assert not bad, f"field mismatches (type, field, gcc, ctypes): {bad[:10]}"


@pytest.mark.parametrize("cname,field", [
    ("struct kvm_run", "io.port"), ("struct kvm_run", "mmio.data"), ("struct kvm_run", "internal.data"),
    ("struct kvm_run", "fail_entry.hardware_entry_failure_reason"),
    ("struct kvm_run", "system_event.type"), ("struct kvm_run", "s.regs"),
    ("struct kvm_cpuid2", "entries[0]"), ("struct kvm_msrs", "entries[0]"),
    ("struct kvm_msr_list", "indices[0]"),
    ("struct kvm_sregs", "interrupt_bitmap"), ("struct kvm_vcpu_events", "exception.nr"),
    ("struct kvm_irqchip", "chip.ioapic"), ("struct kvm_irq_level", "status"),
])
def test_key_fields_are_probed(probe, cname, field):
    rows, _m, _c, _cv = probe
    assert any(c == cname and p == field for c, p, _o, _s in rows)


def test_constants_match_gcc(probe):
    _r, _m, consts, cvals = probe
    assert len(consts) > 500
    mask = (1 << 64) - 1
    bad = [(n, hex(v & mask), hex(cvals[n])) for n, v in consts.items() if v & mask != cvals[n]]
    assert not bad, f"constant mismatches (name, python, gcc): {bad[:10]}"


# Values from /work/shared/reference/x86-boot-and-acpi.md (computed from _IOC by hand there).
REFERENCE_IOCTLS = {
    "KVM_CREATE_VCPU": 0xAE41, "KVM_RUN": 0xAE80, "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47, "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60, "KVM_IRQ_LINE": 0x4008AE61, "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IRQFD": 0x4020AE76, "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05, "KVM_SET_CPUID2": 0x4008AE90, "KVM_SET_REGS": 0x4090AE82,
    "KVM_SET_SREGS": 0x4138AE84, "KVM_SET_MSRS": 0x4008AE89, "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E, "KVM_SET_LAPIC": 0x4400AE8F,
}


@pytest.mark.parametrize("name,value", sorted(REFERENCE_IOCTLS.items()))
def test_ioctl_numbers_match_reference(name, value):
    assert getattr(kb, name) == value, f"{name} = {getattr(kb, name):#x}, reference {value:#x}"
