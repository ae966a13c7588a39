"""Validate every table with ACPICA's own tools (`iasl`, Debian package acpica-tools).

For each SDT: `iasl -d` must disassemble it with no error, warning or "incorrect"/"invalid" note, and
compiling the disassembly back (`iasl -oa`, optimisations off) must give the same bytes. The round
trip proves iasl read every field and every AML term the way we meant it. iasl cannot disassemble a
bare RSDP, so the RSDP is checked the other way round: iasl compiles an RSDP source with our field
values and computes both checksums itself; the result must equal ours.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmm.acpi import aml, build_acpi_tables
from vmm.acpi.madt import build_madt
from vmm.acpi.sdt import HEADER_SIZE, build_sdt

IASL = shutil.which("iasl")
if IASL is None:
    pytest.skip(
        "!!! iasl NOT FOUND: the ACPI tables are NOT being validated. "
        "Install it with `apt-get install acpica-tools`. !!!",
        allow_module_level=True,
    )

PROBLEM_RE = re.compile(r"warning|error|incorrect|invalid|\*\*\*\*|unknown|too long|truncat", re.IGNORECASE)
SUMMARY_RE = re.compile(r"(\d+) Errors, (\d+) Warnings, (\d+) Remarks")

VIRTIO = [(0xD0000000 + i * 0x1000, 0x1000, 5 + i) for i in range(3)]
CONFIGS = {
    "1cpu-no-virtio": (1, []),
    "4cpu-3virtio": (4, VIRTIO),
    "255cpu-20virtio": (
        255,
        [(0xD0000000 + i * 0x1000, 0x1000, g) for i, g in enumerate(g for g in range(24) if g not in (0, 1, 2, 4))],
    ),
}


def run_iasl(cwd: Path, *args: str) -> str:
    proc = subprocess.run([IASL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"iasl {' '.join(args)} failed ({proc.returncode}):\n{output}"
    return output


def disassemble(tmp_path: Path, name: str, table: bytes) -> tuple[str, str]:
    """(iasl output, .dsl text) for one binary table."""
    (tmp_path / f"{name}.dat").write_bytes(table)
    output = run_iasl(tmp_path, "-d", f"{name}.dat")
    dsl_path = tmp_path / f"{name}.dsl"
    assert dsl_path.exists(), f"iasl produced no disassembly:\n{output}"
    return output, dsl_path.read_text()


def problems(output: str, dsl: str) -> list[str]:
    """Lines in which iasl complains (it reports table problems as text, not through its exit status)."""
    # The banner names the product "...Compiler/Disassembler"; it is not a complaint.
    return [line for line in (output + "\n" + dsl).splitlines() if PROBLEM_RE.search(line)]


def compile_asl(tmp_path: Path, name: str, source: str | None = None) -> bytes:
    """Compile tmp_path/name.dsl (or `source`) with optimisations off; require 0 errors/warnings/remarks."""
    src = tmp_path / f"{name}.dsl"
    if source is not None:
        src.write_text(source)
    output = run_iasl(tmp_path, "-oa", "-p", f"{name}-rt", src.name)
    summary = SUMMARY_RE.search(output)
    assert summary, f"no iasl compile summary:\n{output}"
    assert summary.groups() == ("0", "0", "0"), f"iasl compile complained:\n{output}"
    return (tmp_path / f"{name}-rt.aml").read_bytes()


def check_sdt(tmp_path: Path, name: str, table: bytes) -> str:
    """Disassemble cleanly and round-trip to identical bytes; returns the .dsl text."""
    output, dsl = disassemble(tmp_path, name, table)
    assert not problems(output, dsl), "iasl -d reported:\n" + "\n".join(problems(output, dsl))
    rebuilt = compile_asl(tmp_path, name)
    # iasl writes its own creator id/revision and hence its own checksum; everything else must match.
    assert rebuilt[:9] == table[:9]
    assert rebuilt[10:28] == table[10:28]
    assert rebuilt[HEADER_SIZE:] == table[HEADER_SIZE:]
    return dsl


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("sig", ["DSDT", "FACP", "APIC", "XSDT"])
def test_table_disassembles_cleanly_and_round_trips(tmp_path: Path, config: str, sig: str) -> None:
    vcpus, devices = CONFIGS[config]
    _, table = build_acpi_tables(vcpus, devices).tables[sig]
    check_sdt(tmp_path, sig.lower(), table)


@pytest.mark.parametrize("sig", ["DSDT", "FACP"])
def test_tables_without_i8042(tmp_path: Path, sig: str) -> None:
    _, table = build_acpi_tables(2, VIRTIO, i8042=False).tables[sig]
    dsl = check_sdt(tmp_path, sig.lower(), table)
    if sig == "DSDT":
        assert "PNP0303" not in dsl and "Device (_SB.V002)" in dsl
    else:
        assert re.search(r"8042 Present on ports 60/64 \(V2\) : 0", dsl), dsl


def test_madt_with_optional_entries(tmp_path: Path) -> None:
    dsl = check_sdt(tmp_path, "apic", build_madt(2, irq0_override=True, lapic_nmi=True))
    assert "Interrupt Source Override" in dsl
    assert "Local APIC NMI" in dsl


def dsdt_device_blocks(dsl: str) -> dict[str, str]:
    """Device name -> text of its block in the disassembly (blocks are not nested in our DSDT)."""
    blocks = {}
    for match in re.finditer(r"Device \((\S+)\)\n(.*?)\n    \}\n", dsl, re.DOTALL):
        blocks[match.group(1)] = match.group(2)
    return blocks


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dsdt_describes_every_device(tmp_path: Path, config: str) -> None:
    vcpus, devices = CONFIGS[config]
    _, dsdt = build_acpi_tables(vcpus, devices).tables["DSDT"]
    dsl = check_sdt(tmp_path, "dsdt", dsdt)
    blocks = dsdt_device_blocks(dsl)
    assert set(blocks) == {"_SB.COM1", "_SB.PS2"} | {f"_SB.V{i:03d}" for i in range(len(devices))}

    for i, (base, size, gsi) in enumerate(devices):
        block = blocks[f"_SB.V{i:03d}"]
        assert 'Name (_HID, "LNRO0005")' in block
        assert re.search(rf"Memory32Fixed \(ReadWrite,\s+0x{base:08X},\s+// Address Base\s+0x{size:08X},", block), block
        assert re.search(
            rf"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s*\{{\s*0x{gsi:08X},\s*\}}", block
        ), block
    assert dsl.count("LNRO0005") == len(devices)

    assert re.search(r"Name \(\\_S5, Package \(0x04\)[^{]*\{\s*0x05,\s*Zero,\s*Zero,\s*Zero\s*\}", dsl)
    com1 = blocks["_SB.COM1"]
    assert 'EisaId ("PNP0501")' in com1
    assert re.search(r"IO \(Decode16,\s+0x03F8,\s+// Range Minimum\s+0x03F8,", com1)
    assert re.search(r"Edge, ActiveHigh, Exclusive, ,, \)\s*\{\s*0x00000004,", com1)
    ps2 = blocks["_SB.PS2"]
    assert 'EisaId ("PNP0303")' in ps2
    assert re.search(r"0x0060,\s+// Range Minimum", ps2) and re.search(r"0x0064,\s+// Range Minimum", ps2)
    assert re.search(r"Edge, ActiveHigh, Exclusive, ,, \)\s*\{\s*0x00000001,", ps2)


def test_encoder_round_trip_beyond_the_dsdt(tmp_path: Path) -> None:
    """Terms our DSDT does not use yet: Scope, multi-segment paths, serialized methods, QWord, Ones,
    nested packages and a buffer large enough for a 3-byte PkgLength."""
    body = aml.scope(
        "\\_SB_",
        aml.device(
            "FOO_",
            aml.name("_HID", aml.eisa_id("PNP0A05")),
            aml.name("_UID", 7),
            aml.name("BIG_", aml.buffer(bytes(range(256)) * 20)),
            aml.method(
                "M1__",
                0,
                True,
                aml.return_(aml.package(aml.qword_const(0x123456789), aml.ones(), aml.package("x", 0x1234))),
            ),
        ),
    )
    body += aml.name("\\_SB_.FOO_.BAZ_", 0x12345678)
    assert aml.pkg_length(0x1400 + 3)[0] >> 6 == 2  # the buffer needs a 3-byte PkgLength
    table = build_sdt(b"DSDT", 2, b"PYVMTEST", body)
    dsl = check_sdt(tmp_path, "synthetic", table)
    assert "Method (M1, 0, Serialized)" in dsl
    assert "0x0000000123456789" in dsl
    assert "Buffer (0x1400)" in dsl


def test_rsdp_checksums_match_iasl(tmp_path: Path) -> None:
    t = build_acpi_tables(2, VIRTIO)
    _, rsdp = t.tables["RSD PTR "]
    sig, _csum, oem, rev, rsdt, length, xsdt, _ext, _res = struct.unpack("<8sB6sBIIQB3s", rsdp)
    source = (
        f'[0008]                          Signature : "{sig.decode()}"\n'
        "[0001]                           Checksum : 00\n"
        f'[0006]                             Oem ID : "{oem.decode()}"\n'
        f"[0001]                           Revision : {rev:02X}\n"
        f"[0004]                       RSDT Address : {rsdt:08X}\n"
        f"[0004]                             Length : {length:08X}\n"
        f"[0008]                       XSDT Address : {xsdt:016X}\n"
        "[0001]                  Extended Checksum : 00\n"
        "[0003]                           Reserved : 000000\n"
    )
    (tmp_path / "rsdp.asl").write_text(source)
    output = run_iasl(tmp_path, "rsdp.asl")
    assert SUMMARY_RE.search(output).groups() == ("0", "0", "0"), output
    assert (tmp_path / "rsdp.aml").read_bytes() == rsdp


# --- the checker itself must be able to fail ----------------------------------------------------

def test_checker_catches_a_bad_checksum(tmp_path: Path) -> None:
    table = bytearray(build_acpi_tables(1, VIRTIO).tables["FACP"][1])
    table[9] ^= 0x01
    output, dsl = disassemble(tmp_path, "facp", bytes(table))
    assert any("checksum" in line.lower() for line in problems(output, dsl))


def test_checker_catches_a_broken_madt_entry(tmp_path: Path) -> None:
    madt = bytearray(build_madt(1))
    madt += bytes(2)  # a zero-length trailing subtable
    struct.pack_into("<I", madt, 4, len(madt))
    madt[9] = 0
    madt[9] = (-sum(madt)) & 0xFF
    output, dsl = disassemble(tmp_path, "apic", bytes(madt))
    assert problems(output, dsl)


def test_checker_catches_an_aml_encoding_mistake(tmp_path: Path) -> None:
    """A resource template whose length byte is off by one no longer decodes as a ResourceTemplate,
    so the disassembly and its recompilation no longer match our bytes."""
    dsdt = bytearray(build_acpi_tables(1, VIRTIO[:1]).tables["DSDT"][1])
    at = dsdt.find(bytes.fromhex("111a0a17"))
    dsdt[at + 1] = 0x19
    dsdt[9] = 0
    dsdt[9] = (-sum(dsdt)) & 0xFF
    output, dsl = disassemble(tmp_path, "dsdt", bytes(dsdt))
    assert "Memory32Fixed" not in dsl
    with pytest.raises(AssertionError):
        rebuilt = compile_asl(tmp_path, "dsdt")
        assert rebuilt[HEADER_SIZE:] == dsdt[HEADER_SIZE:]
