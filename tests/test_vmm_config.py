"""Config validation: every mistake names the file and the key, and good configs load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmm.config import (ConfigError, exec_to_script, load_config, parse_shared_dir,
                        with_overrides)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vm.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_and_shipped_configs_load():
    for cfg in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(cfg)
        assert config.vm.vcpus >= 1
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.kernel.path == "auto"


def test_full_config(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    p = write(tmp_path, """
        vm: {vcpus: 2, memory_mib: 96, discovery: both}
        kernel: {path: auto, cmdline: "loglevel=4"}
        guest: {script: "echo hi\\n", timeout: 30}
        devices:
          - type: fs
            source: share
            tag: data
            cache: never
            timeout: 2.5
            negative_timeout: 60
            writeback: true
            max_inodes: 5000
            max_handles: 300
            readdir_buffer: 8192
            max_write: 131072
    """)
    cfg = load_config(p)
    assert cfg.vm.vcpus == 2 and cfg.vm.memory_mib == 96 and cfg.vm.discovery == "both"
    (dev,) = cfg.devices
    assert dev.source == str(share) and dev.tag == "data" and dev.cache == "never"
    assert dev.timeout == 2.5 and dev.negative_timeout == 60.0 and dev.writeback is True
    assert (dev.max_inodes, dev.max_handles, dev.readdir_buffer, dev.max_write) == (
        5000, 300, 8192, 131072)
    assert cfg.guest.script == "echo hi\n" and cfg.guest.timeout == 30


@pytest.mark.parametrize("body, needle", [
    ("vm: {vcpu: 2}", "unknown key: vm.vcpu (did you mean 'vcpus'?)"),
    ("devices: [{type: fs, source: /tmp, tag: a, negative_timout: 5}]",
     "unknown key: devices[0].negative_timout (did you mean 'negative_timeout'?)"),
    ("vm: {vcpus: two}", "vm.vcpus: expected an integer"),
    ("vm: {vcpus: true}", "vm.vcpus: expected an integer, got a boolean"),
    ("vm: {vcpus: 0}", "vm.vcpus: must be between 1 and 8"),
    ("vm: {memory_mib: 4}", "vm.memory_mib: must be between"),
    ("vm: {discovery: pci}", "vm.discovery: must be one of"),
    ("vm: [1, 2]", "vm: expected a mapping"),
    ("kernel: {path: /nonexistent/vmlinux}", "kernel.path: /nonexistent/vmlinux does not exist"),
    ("kernel: {initrd: missing.cpio}", "kernel.initrd:"),
    ("guest: {script_file: nope.txt}", "guest.script_file:"),
    ("guest: {timeout: -1}", "guest.timeout: must be a finite number"),
    ("frobnicate: 1", "unknown key: frobnicate"),
    ("gust: {timeout: 5}", "unknown key: gust (did you mean 'guest'?)"),
    ("devices: [{type: net}]", "devices[0].type: unknown device type 'net'"),
    ("devices: [{type: fs, tag: x}]", "devices[0].source: is required"),
    ("devices: [{type: fs, source: /nonexistent-dir, tag: x}]", "devices[0].source:"),
    ("devices: [{type: fs, source: /etc/hostname, tag: x}]", "is not a directory"),
    ("devices: [{type: fs, source: /tmp, tag: " + "t" * 37 + "}]", "devices[0].tag:"),
    ("devices: [{type: fs, source: /tmp, tag: a, timeout: .inf}]", "devices[0].timeout: must be a finite"),
    ("devices: [{type: fs, source: /tmp, tag: a, negative_timeout: -2}]",
     "devices[0].negative_timeout: must be a finite"),
    ("devices: [{type: fs, source: /tmp, tag: a, negative_timeout: lots}]",
     "devices[0].negative_timeout: expected a number"),
    ("devices: [{type: fs, source: /tmp, tag: a, cache: sometimes}]", "devices[0].cache: must be one of"),
    ("devices: [{type: fs, source: /tmp, tag: a, colour: red}]", "unknown key: devices[0].colour"),
    ("devices: [{type: fs, source: /tmp, tag: a}, {type: fs, source: /tmp, tag: a}]", "duplicate tag 'a'"),
    ("vm: {vcpus: 1", "not valid YAML"),
    ("devices: [{type: fs, source: /tmp, tag: a, max_inodes: 3}]",
     "devices[0].max_inodes: must be between 16 and"),
    ("devices: [{type: fs, source: /tmp, tag: a, max_handles: many}]",
     "devices[0].max_handles: expected an integer"),
    ("devices: [{type: fs, source: /tmp, tag: a, max_write: 5000}]",
     "devices[0].max_write: max_write must be a multiple of 4096"),
    ("devices: [{type: fs, source: /tmp, tag: a, readdir_buffer: 100}]",
     "devices[0].readdir_buffer: must be between 1024"),
])
def test_bad_configs_name_file_and_key(tmp_path, body, needle):
    p = write(tmp_path, body + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value)
    assert needle in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shared_dir_syntax(tmp_path):
    opts = parse_shared_dir(f"{tmp_path}:tag1:type=fs:cache=always:timeout=3600:negative_timeout=0.5")
    assert (opts.source, opts.tag, opts.cache, opts.timeout, opts.negative_timeout) == (
        str(tmp_path), "tag1", "always", 3600.0, 0.5)
    assert parse_shared_dir(f"{tmp_path}:t").negative_timeout == 0.0
    opts = parse_shared_dir(f"{tmp_path}:t:max_inodes=100:max_handles=20:readdir_buffer=2048"
                            ":max_write=65536")
    assert (opts.max_inodes, opts.max_handles, opts.readdir_buffer, opts.max_write) == (
        100, 20, 2048, 65536)


@pytest.mark.parametrize("suffix, needle", [
    (":t:negative_timeout=nan", "negative_timeout: must be a finite"),
    (":t:negative_timeout=-1", "negative_timeout: must be a finite"),
    (":t:timeout=x", "timeout: expected a number"),
    (":t:type=p9", "only type=fs"),
    (":t:bogus=1", "bogus: unknown option"),
    (":t:writeback=yes", "expected true or false"),
    (":t:cache", "expected key=value"),
    (":t:max_handles=0", "max_handles: expected an integer between 16 and"),
    (":t:max_inodes=-5", "max_inodes: expected an integer between"),
    (":t:max_write=4097", "max_write: max_write must be a multiple of 4096"),
    ("", "expected PATH:TAG"),
])
def test_shared_dir_errors(tmp_path, suffix, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_shared_dir(f"{tmp_path}{suffix}")


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "vm: {vcpus: 1}\n"))
    share = parse_shared_dir(f"{tmp_path}:s")
    cfg2 = with_overrides(cfg, vcpus=4, memory_mib=64, script="exit 3\n", shared_dirs=[share])
    assert cfg2.vm.vcpus == 4 and cfg2.vm.memory_mib == 64 and cfg2.guest.script == "exit 3\n"
    assert cfg2.devices == (share,)
    with pytest.raises(ConfigError, match="--vcpus"):
        with_overrides(cfg, vcpus=9)
    with pytest.raises(ConfigError, match="duplicate tag"):
        with_overrides(cfg2, shared_dirs=[share])


def test_exec_to_script():
    assert exec_to_script("echo hello-from-guest; exit 3") == "echo hello-from-guest\nexit 3\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_bad_config_is_one_line_status_2(tmp_path):
    p = write(tmp_path, "vm: {vcpus: many}\n")
    r = run_cli("run", str(p))
    assert r.returncode == 2
    assert r.stderr.strip() == f"pyvmm: error: {p}: vm.vcpus: expected an integer, got a string 'many'"
    assert "Traceback" not in r.stderr


def test_cli_missing_kernel_status_2(tmp_path):
    p = write(tmp_path, "kernel: {path: missing-vmlinux}\n")
    r = run_cli("run", str(p))
    assert r.returncode == 2
    assert f"kernel.path: {tmp_path / 'missing-vmlinux'} does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_garbage_kernel_status_2(tmp_path):
    junk = tmp_path / "vmlinux"
    junk.write_bytes(b"this is not a kernel" * 100)
    p = write(tmp_path, f"kernel: {{path: {junk}}}\n")
    r = run_cli("run", str(p), "--exec", "exit 0")
    assert r.returncode == 2, r.stderr
    assert "vmlinux" in r.stderr and "Traceback" not in r.stderr


def test_installed_console_script_is_the_cli(tmp_path):
    """`pyvmm` (from pyproject's [project.scripts]) runs the same CLI as `python -m vmm`."""
    import shutil
    script = shutil.which("pyvmm", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert script, "the pyvmm console script is not installed (pip install -e .)"
    p = write(tmp_path, "vm: {vcpus: 99}\n")
    r = subprocess.run([script, "run", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "vm.vcpus: must be between 1 and 8" in r.stderr


def test_run_help_shows_an_example():
    r = run_cli("run", "--help")
    assert r.returncode == 0
    assert "python -m vmm run configs/default.yaml --exec 'echo hello; exit 3'" in r.stdout
    example = next(line for line in r.stdout.splitlines() if "--shared-dir /srv" in line)
    assert "negative_timeout=60" in example
