"""guest/build.py pieces that run without compiling a kernel: cache keying, config checks, patches."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from guest import build
from guest.build import BuildError, build_inputs, kernel_hash, parse_config, verify_config


def _copy_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    frag = tmp_path / "pyvmm.config"
    shutil.copy(build.FRAGMENT, frag)
    patches = tmp_path / "patches"
    shutil.copytree(build.PATCH_DIR, patches)
    agent = tmp_path / "agent"
    shutil.copytree(build.AGENT_DIR, agent)
    return frag, patches, agent


def _hash(tmp_path: Path, version: str = "6.1.192-2") -> str:
    frag, patches, agent = tmp_path / "pyvmm.config", tmp_path / "patches", tmp_path / "agent"
    return kernel_hash(build_inputs(version, fragment=frag, patch_dir=patches, agent_dir=agent))


def test_hash_is_stable_and_matches_repo(tmp_path):
    _copy_inputs(tmp_path)
    assert _hash(tmp_path) == _hash(tmp_path)
    assert _hash(tmp_path) == kernel_hash(build_inputs("6.1.192-2"))
    assert re.fullmatch(r"[0-9a-f]{24}", _hash(tmp_path))


@pytest.mark.parametrize("change", ["version", "fragment", "patch", "new_patch", "agent_c",
                                    "agent_h", "new_agent_file", "kconfig"])
def test_hash_changes_with_every_input(tmp_path, change):
    frag, patches, agent = _copy_inputs(tmp_path)
    before = _hash(tmp_path)
    if change == "version":
        assert _hash(tmp_path, "6.1.193-1") != before
        return
    if change == "fragment":
        frag.write_text(frag.read_text() + "CONFIG_FOO=y\n")
    elif change == "patch":
        first = sorted(patches.glob("*.patch"))[0]
        first.write_text(first.read_text() + "\n")
    elif change == "new_patch":
        (patches / "9999-extra.patch").write_text("x\n")
    elif change == "agent_c":
        (agent / "ops.c").write_text((agent / "ops.c").read_text() + "\n")
    elif change == "agent_h":
        (agent / "agent.h").write_text((agent / "agent.h").read_text() + "\n")
    elif change == "new_agent_file":
        (agent / "extra.c").write_text("\n")
    elif change == "kconfig":
        (agent / "Kconfig").write_text((agent / "Kconfig").read_text() + "\n")
    assert _hash(tmp_path) != before


def test_hash_ignores_build_products_in_agent_dir(tmp_path):
    _, _, agent = _copy_inputs(tmp_path)
    before = _hash(tmp_path)
    (agent / "ops.o").write_bytes(b"\x7fELF")
    (agent / ".ops.o.cmd").write_text("x")
    assert _hash(tmp_path) == before


def test_cached_path_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    assert build.cached_kernel("abc", "bzImage") == tmp_path / "kernel" / "abc" / "bzImage"
    with pytest.raises(ValueError, match="unknown kernel image"):
        build.cached_kernel("abc", "zImage")
    assert build.cached_kernel("abc") == tmp_path / "kernel" / "abc" / "vmlinux"
    monkeypatch.delenv("PYVMM_CACHE")
    assert build.cached_kernel("abc") == Path.home() / ".cache/pyvmm/kernel/abc/vmlinux"


def test_parse_config_forms():
    text = ("# comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=8\n"
            'CONFIG_D="percpu_alloc=page x"\nCONFIG_E=n\n')
    assert parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": "8",
                                  "CONFIG_D": '"percpu_alloc=page x"', "CONFIG_E": "n"}


@pytest.mark.parametrize("bad", ["CONFIG_A y", "A=y", "CONFIG_A"])
def test_parse_config_rejects_typos(bad):
    with pytest.raises(BuildError):
        parse_config(bad + "\n")


def test_verify_config_names_every_problem():
    wanted = parse_config("CONFIG_A=y\nCONFIG_B=8\n# CONFIG_C is not set\nCONFIG_D=n\n"
                          "CONFIG_E=y\nCONFIG_F=\"x\"\n")
    actual = parse_config("CONFIG_A=y\nCONFIG_B=4\nCONFIG_C=y\nCONFIG_F=\"x\"\n")
    problems = verify_config(wanted, actual)
    assert len(problems) == 3
    assert any("CONFIG_B wanted 8, got 4" in p for p in problems)
    assert any("CONFIG_C wanted off, got y" in p for p in problems)
    assert any("CONFIG_E wanted y, got off" in p for p in problems)
    assert verify_config(wanted, {**actual, "CONFIG_B": "8", "CONFIG_C": None, "CONFIG_E": "y"}) == []


def test_fragment_has_what_the_agent_and_platform_need():
    frag = parse_config(build.FRAGMENT.read_text())
    for key in ("CONFIG_64BIT", "CONFIG_SMP", "CONFIG_PRINTK", "CONFIG_SERIAL_8250_CONSOLE",
                "CONFIG_BLK_DEV_INITRD", "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
                "CONFIG_FUSE_FS", "CONFIG_VIRTIO_FS", "CONFIG_CRC32", "CONFIG_PYVMM_AGENT",
                "CONFIG_ACPI", "CONFIG_KVM_GUEST"):
        assert frag.get(key) == "y", key
    for key in ("CONFIG_JUMP_LABEL", "CONFIG_RELOCATABLE", "CONFIG_RANDOMIZE_BASE",
                "CONFIG_LEGACY_PTYS", "CONFIG_UNIX98_PTYS", "CONFIG_RD_GZIP"):
        assert key in frag and frag[key] is None, key
    assert frag["CONFIG_NR_CPUS"] == "8"
    assert frag["CONFIG_SERIAL_8250_NR_UARTS"] == "1"


def test_agent_kconfig_defines_the_fragment_symbol():
    assert re.search(r"^config PYVMM_AGENT$", (build.AGENT_DIR / "Kconfig").read_text(), re.M)


def test_patches_explain_themselves():
    patches = sorted(build.PATCH_DIR.glob("*.patch"))
    assert [p.name[:4] for p in patches] == [f"{i:04d}" for i in range(1, len(patches) + 1)]
    assert len(patches) >= 4
    for p in patches:
        text = p.read_text()
        header = text[:text.index("--- a/")]
        assert header.startswith("pyvmm: ") and "Why" in header, p.name
        assert re.search(r"^\+\+\+ b/", text, re.M)


def test_patches_apply_to_the_source_package(tmp_path):
    """Each patch applies cleanly to the pristine files it touches (no kernel build)."""
    # .ci/setup.sh installs both; a missing one is a broken set-up, not a reason to skip.
    assert build.TARBALL.exists(), f"{build.TARBALL} missing: run .ci/setup.sh (linux-source-6.1)"
    assert shutil.which("patch"), "patch(1) missing: run .ci/setup.sh (package patch)"
    touched = set()
    for p in sorted(build.PATCH_DIR.glob("*.patch")):
        touched |= set(re.findall(r"^\+\+\+ b/(\S+)", p.read_text(), re.M))
    members = [f"{build.TREE_NAME}/{t}" for t in sorted(touched)]
    subprocess.run(["tar", "-xf", str(build.TARBALL), "-C", str(tmp_path), *members], check=True)
    tree = tmp_path / build.TREE_NAME
    for p in sorted(build.PATCH_DIR.glob("*.patch")):
        res = subprocess.run(["patch", "-p1", "--forward", "--batch", "-F0"], cwd=tree,
                             input=p.read_bytes(), capture_output=True)
        assert res.returncode == 0, (p.name, res.stdout.decode())
    assert "pyvmm_agent/" in (tree / "fs/Makefile").read_text()


def test_prune_keeps_the_newest_kernels(tmp_path):
    import os
    kdir = tmp_path / "kernel"
    (tmp_path / "build").mkdir()
    for i in range(5):
        d = kdir / f"k{i}"
        d.mkdir(parents=True)
        (d / "vmlinux").write_bytes(b"x")
        (tmp_path / "build" / f"build-k{i}.log").write_text("log")
        os.utime(d, (1000 + i, 1000 + i))
    build._prune(tmp_path, keep=2)
    assert sorted(p.name for p in kdir.iterdir()) == ["k3", "k4"]
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["build-k3.log", "build-k4.log"]


def test_variant_has_its_own_key_and_leaves_the_default_alone(tmp_path):
    """A variant (guest/kernel/<name>.config over pyvmm.config) gets its own cache key; the
    default kernel's key is what it was without variants, so no one rebuilds for DAX."""
    plain = build_inputs("6.1.192-2")
    dax = build_inputs("6.1.192-2", variant="dax")
    assert plain.variant == () and kernel_hash(plain) != kernel_hash(dax)
    merged = parse_config(dax.merged_fragment().decode())
    assert merged["CONFIG_FUSE_DAX"] == "y" and merged["CONFIG_ZONE_DEVICE"] == "y"
    assert merged["CONFIG_VIRTIO_FS"] == "y"                 # the base fragment is still there
    assert plain.merged_fragment() == plain.fragment
    with pytest.raises(BuildError, match="unknown kernel variant"):
        build_inputs("6.1.192-2", variant="nope")
