"""VM configuration: YAML files and command-line overrides, validated into dataclasses.

Every key is checked: an unknown key, a wrong type, an out-of-range value or a missing file raises
`ConfigError` with one line naming the file and the key, so the CLI can print it and exit with
status 2 instead of failing halfway through a boot.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from devices.virtio.fs.options import (
    LIMIT_RANGES,
    SANDBOX_MODES,
    XATTR_POLICIES,
    FsOptions,
    check_seconds,
)
from devices.virtio.fs.options import DAX_WINDOW_MIB_RANGE, DEFAULT_DAX_WINDOW_MIB
from devices.virtio.fs.idmap import IDMAP_MODES
from devices.virtio.vhost_user.frontend import VhostUserFsOptions

DISCOVERY_MODES = ("cmdline", "acpi", "both")
MAX_VCPUS = 8
MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 64 * 1024


class ConfigError(Exception):
    """A configuration problem, phrased for the user: `<file>: <key>: <what is wrong>`."""


@dataclass(frozen=True)
class VmConfig:
    vcpus: int = 1
    memory_mib: int = 128
    # How the guest learns about its virtio-mmio devices. `cmdline` (virtio_mmio.device=) is the
    # default because the project kernel supports it and it costs no ACPI parsing in a guest whose
    # kernel code runs through an instruction emulator on our machines; `acpi` is what stock
    # distribution kernels need; `both` announces them both ways (the kernel ignores duplicates).
    discovery: str = "cmdline"


@dataclass(frozen=True)
class KernelConfig:
    path: str = "auto"                 # "auto" = the project kernel (built and cached on demand)
    initrd: Path | None = None         # optional cpio, concatenated before the agent's script
    cmdline: str = ""                  # appended to the VMM's command line


@dataclass(frozen=True)
class GuestConfig:
    script: str | None = None          # agent script text; None = boot without a script
    timeout: float = 900.0             # wall-clock seconds before the VMM gives up on the guest


@dataclass(frozen=True)
class SerialConfig:
    log: Path | None = None            # also copy the console to this file
    stdin: bool = True                 # feed the host terminal to COM1 when stdin is a TTY


@dataclass(frozen=True)
class Config:
    vm: VmConfig = field(default_factory=VmConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    guest: GuestConfig = field(default_factory=GuestConfig)
    serial: SerialConfig = field(default_factory=SerialConfig)
    # `type: fs` shares served in this process, `type: vhost-user-fs` devices served by a back-end
    devices: tuple[FsOptions | VhostUserFsOptions, ...] = ()
    source: str = "<defaults>"         # where this config came from, for messages

    @property
    def uses_vhost_user(self) -> bool:
        return any(isinstance(d, VhostUserFsOptions) for d in self.devices)

    @property
    def sandboxed_devices(self) -> tuple[FsOptions, ...]:
        """`type: fs` devices served by a jailed back-end child (sandbox != none)."""
        return tuple(d for d in self.devices if isinstance(d, FsOptions) and d.sandbox != "none")

    @property
    def shares_guest_memory(self) -> bool:
        """Guest RAM must be a memfd another process can map: a vhost-user back-end's, or a
        sandboxed fs device's child."""
        return self.uses_vhost_user or bool(self.sandboxed_devices)


# --------------------------------------------------------------------------------------------
# Small typed accessors: each names the key and the file in its error.

class _Section:
    """A YAML mapping being consumed key by key; leftover keys are reported as unknown."""

    def __init__(self, data: Any, where: str, source: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {_kind(data)}")
        self.data = dict(data)
        self.where = where
        self.source = source
        self.known: list[str] = []  # every key asked for, for "did you mean" on unknown ones

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name)}: {message}")

    def take(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.known.append(name)
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if value is None and default is None:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; never accept true/false where a number is expected.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_names(kinds)}, got {_kind(value)} {value!r}")
        return value

    def take_int(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.take(name, int, default)
        if not lo <= value <= hi:
            raise self.error(name, f"must be between {lo} and {hi}, got {value}")
        return value

    def take_seconds(self, name: str, default: float) -> float:
        value = self.take(name, (int, float), default)
        return _seconds(value, lambda msg: self.error(name, msg))

    def take_choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.take(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def take_path(self, name: str, base: Path, must_exist: bool = True, directory: bool = False
                  ) -> Path | None:
        value = self.take(name, str, None)
        if value is None:
            return None
        return check_path(value, base, must_exist, directory, lambda msg: self.error(name, msg))

    def finish(self) -> None:
        if self.data:
            unknown = ", ".join(sorted(self.key(str(k)) + did_you_mean(str(k), self.known)
                                       for k in self.data))
            raise ConfigError(f"{self.source}: unknown key: {unknown}")


def did_you_mean(name: str, known: list[str]) -> str:
    """" (did you mean 'x'?)" for the closest known name, or ""."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer",
            float: "a number", bool: "a boolean", type(None): "nothing"}.get(type(value), type(value).__name__)


def _names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             dict: "a mapping", list: "a list"}
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _seconds(value: Any, error: Callable[[str], Exception]) -> float:
    """devices.virtio.fs.options.check_seconds (the one timeout rule), as a config error."""
    try:
        return check_seconds(value)
    except ValueError as exc:
        raise error(str(exc)) from None


def check_path(value: str, base: Path, must_exist: bool, directory: bool,
               error: Callable[[str], Exception]) -> Path:
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = base / path
    if must_exist and not path.exists():
        raise error(f"{path} does not exist")
    if directory and path.exists() and not path.is_dir():
        raise error(f"{path} is not a directory")
    if must_exist and not directory and path.is_dir():
        raise error(f"{path} is a directory, expected a file")
    return path


# --------------------------------------------------------------------------------------------

FS_BOOL_KEYS = ("writeback", "trace", "allow_setid", "allow_mknod", "allow_selinux_xattr",
                "ascii_casefold", "posix_acl", "security_ctx")
#: crosvm's id maps ("inner outer count[,...]"; devices/virtio/fs/idmap.py checks them).
FS_IDMAP_KEYS = ("uidmap", "gidmap")
#: Integer device keys bounding what one device may hold (FsOptions checks them).
FS_LIMIT_KEYS = tuple(LIMIT_RANGES)


def fs_options(values: dict[str, Any], error: Callable[[str, str], Exception], base: Path) -> FsOptions:
    """Build FsOptions from already-typed values, turning its ValueErrors into config errors."""
    source = values["source"]
    path = check_path(str(source), base, True, True, lambda msg: error("source", msg))
    kwargs = dict(values)
    kwargs["source"] = str(path.resolve())
    for key in ("timeout", "negative_timeout"):
        if key in kwargs:
            kwargs[key] = _seconds(kwargs[key], functools.partial(error, key))
    if kwargs.get("trace_path"):
        kwargs["trace_path"] = str(check_path(str(kwargs["trace_path"]), base, False, False,
                                              lambda msg: error("trace_path", msg)))
    try:
        return FsOptions(**kwargs)
    except ValueError as exc:
        raise error(_field_of(exc, kwargs), str(exc)) from None


def _field_of(exc: ValueError, kwargs: dict[str, Any]) -> str:
    text = str(exc)
    for key in kwargs:
        if text.startswith(key) or f"'{key}'" in text or f" {key} " in f" {text} ":
            return key
    return "options"


def _parse_fs_device(section: _Section, base: Path) -> FsOptions:
    section.known += ["type", *(f.name for f in fields(FsOptions))]
    values: dict[str, Any] = {}
    source = section.take("source", str, None)
    if source is None:
        raise section.error("source", "is required (the host directory to share)")
    values["source"] = source
    tag = section.take("tag", str, None)
    if tag is None:
        raise section.error("tag", "is required (the name the guest mounts)")
    values["tag"] = tag
    if "num_request_queues" in section.data:
        values["num_request_queues"] = section.take_int("num_request_queues", 1, 1, 64)
    if "cache" in section.data:
        values["cache"] = section.take_choice("cache", "auto", ("never", "auto", "always"))
    if "xattr_policy" in section.data:
        values["xattr_policy"] = section.take_choice("xattr_policy", "remap", XATTR_POLICIES)
    for key in ("timeout", "negative_timeout"):
        if key in section.data:
            values[key] = section.take_seconds(key, 0.0)
    for key in FS_BOOL_KEYS:
        if key in section.data:
            values[key] = section.take(key, bool, False)
    for key in FS_LIMIT_KEYS:
        if key in section.data:
            values[key] = section.take_int(key, 0, *LIMIT_RANGES[key])
    if "trace_path" in section.data:
        values["trace_path"] = section.take("trace_path", str, None)
    # DAX window (devices/virtio/fs/dax.py)
    if "dax" in section.data:
        values["dax"] = section.take("dax", bool, False)
    if "dax_window_mib" in section.data:
        values["dax_window_mib"] = section.take_int("dax_window_mib", DEFAULT_DAX_WINDOW_MIB,
                                                    *DAX_WINDOW_MIB_RANGE)
    for key in FS_IDMAP_KEYS:
        if key in section.data:
            values[key] = section.take(key, str, None)
    if "sandbox" in section.data:
        values["sandbox"] = section.take_choice("sandbox", "namespace", SANDBOX_MODES)
    if "idmap" in section.data:     # where uidmap/gidmap apply (idmap.py)
        values["idmap"] = section.take_choice("idmap", "auto", IDMAP_MODES)
    section.take("type", str, "fs")
    section.finish()
    return fs_options(values, section.error, base)


#: DAX needs a back-end that maps over the back-end request channel and a known window size.
_NO_FOREIGN_DAX = ("not offered for a foreign back-end: use a `type: fs` share (its sandboxed "
                   "back-end maps into the DAX window)")


def _parse_vhost_user_fs_device(section: _Section, base: Path) -> VhostUserFsOptions:
    """`type: vhost-user-fs`: a virtio-fs device whose back-end is another process."""
    sock = section.take("socket", str, None)
    if sock is None:
        raise section.error("socket", "is required (the back-end's vhost-user socket)")
    tag = section.take("tag", str, None)
    if tag is None:
        raise section.error("tag", "is required (the name the guest mounts)")
    queues = section.take_int("num_request_queues", 1, 1, 64)
    for key in ("dax", "dax_window_mib"):
        if key in section.data:
            raise section.error(key, _NO_FOREIGN_DAX)
    section.take("type", str, "vhost-user-fs")
    section.finish()
    return vhost_user_fs_options(sock, tag, queues, base, section.error)


def vhost_user_fs_options(sock: str, tag: str, queues: int, base: Path,
                          error: Callable[[str, str], Exception]) -> VhostUserFsOptions:
    """The socket path resolved against `base` (it need not exist yet: the back-end may start
    after the config is read; a missing one is reported, naming it, when the VM is assembled)."""
    path = Path(os.path.expanduser(sock))
    if not path.is_absolute():
        path = base / path
    try:
        return VhostUserFsOptions(socket=str(path), tag=tag, num_request_queues=queues)
    except ValueError as exc:
        raise error(_field_of(exc, {"socket": 0, "tag": 0, "num_request_queues": 0}), str(exc)) from None


def parse_vhost_user_fs(spec: str, base: Path | None = None) -> VhostUserFsOptions:
    """`--vhost-user-fs SOCKET:TAG[:num_request_queues=N]`."""
    where = f"--vhost-user-fs {spec}"
    parts = spec.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"{where}: expected SOCKET:TAG[:num_request_queues=N]")

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}")

    queues = 1
    for item in parts[2:]:
        key, sep, raw = item.partition("=")
        if key in ("dax", "dax_window_mib"):
            raise error(key, _NO_FOREIGN_DAX)
        if key != "num_request_queues" or not sep:
            raise error(key, "unknown option (known: num_request_queues)")
        if not raw.isdigit() or not 1 <= int(raw) <= 64:
            raise error(key, f"expected an integer between 1 and 64, got {raw!r}")
        queues = int(raw)
    return vhost_user_fs_options(parts[0], parts[1], queues, base or Path.cwd(), error)


DEVICE_TYPES = ("fs", "vhost-user-fs")


def _check_devices(devices: list[FsOptions | VhostUserFsOptions], source: str) -> None:
    seen: set[str] = set()
    for dev in devices:
        if dev.tag in seen:
            raise ConfigError(f"{source}: devices: duplicate tag {dev.tag!r}: every shared "
                              "directory needs its own tag")
        seen.add(dev.tag)


def parse_config(data: Any, source: str, base: Path) -> Config:
    top = _Section(data, "", source)

    vm = _Section(top.take("vm", dict, {}), "vm", source)
    vm_cfg = VmConfig(
        vcpus=vm.take_int("vcpus", 1, 1, MAX_VCPUS),
        memory_mib=vm.take_int("memory_mib", 128, MIN_MEMORY_MIB, MAX_MEMORY_MIB),
        discovery=vm.take_choice("discovery", "cmdline", DISCOVERY_MODES),
    )
    vm.finish()

    k = _Section(top.take("kernel", dict, {}), "kernel", source)
    path = k.take("path", str, "auto")
    if path != "auto":
        path = str(check_path(path, base, True, False, lambda msg: k.error("path", msg)))
    kernel_cfg = KernelConfig(path=path, initrd=k.take_path("initrd", base),
                              cmdline=k.take("cmdline", str, ""))
    k.finish()

    g = _Section(top.take("guest", dict, {}), "guest", source)
    script = g.take("script", str, None)
    script_file = g.take_path("script_file", base)
    if script is not None and script_file is not None:
        raise g.error("script_file", "give either guest.script or guest.script_file, not both")
    if script_file is not None:
        script = script_file.read_text()
    timeout = g.take_seconds("timeout", 900.0)
    if timeout == 0:
        raise g.error("timeout", "must be greater than 0")
    guest_cfg = GuestConfig(script=script, timeout=timeout)
    g.finish()

    s = _Section(top.take("serial", dict, {}), "serial", source)
    serial_cfg = SerialConfig(log=s.take_path("log", base, must_exist=False),
                              stdin=s.take("stdin", bool, True))
    s.finish()

    raw_devices = top.take("devices", list, [])
    devices: list[FsOptions | VhostUserFsOptions] = []
    for i, raw in enumerate(raw_devices):
        dev = _Section(raw, f"devices[{i}]", source)
        kind = dev.data.get("type")
        if kind == "fs":
            devices.append(_parse_fs_device(dev, base))
        elif kind == "vhost-user-fs":
            devices.append(_parse_vhost_user_fs_device(dev, base))
        else:
            raise dev.error("type", f"unknown device type {kind!r} (supported: "
                                    f"{', '.join(DEVICE_TYPES)})")
    _check_devices(devices, source)
    top.finish()
    return Config(vm=vm_cfg, kernel=kernel_cfg, guest=guest_cfg, serial=serial_cfg,
                  devices=tuple(devices), source=source)


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file does not exist")
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, expected a YAML config file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    return parse_config(data, str(p), p.resolve().parent)


# --------------------------------------------------------------------------------------------
# crosvm-style --shared-dir PATH:TAG[:key=value...]

def parse_shared_dir(spec: str, base: Path | None = None) -> FsOptions:
    """Parse `--shared-dir PATH:TAG[:key=value...]` (crosvm's syntax, `type=fs` implied)."""
    where = f"--shared-dir {spec}"
    parts = spec.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"{where}: expected PATH:TAG[:key=value...]")
    return parse_fs_option_items(where, parts[0], parts[1], parts[2:], base)


FS_OPTION_KEYS = ("type", "cache", "timeout", "negative_timeout", "writeback",
                  "num_request_queues", "trace", "trace_path", "allow_setid", "allow_mknod",
                  "xattr_policy", "allow_selinux_xattr", *FS_LIMIT_KEYS, "sandbox",
                  "ascii_casefold", "posix_acl", "security_ctx", *FS_IDMAP_KEYS)
FS_OPTION_KEYS += ("dax", "dax_window_mib")   # DAX window
FS_OPTION_KEYS += ("idmap",)                   # where uidmap/gidmap apply


def parse_fs_option_items(where: str, source: str, tag: str, items: list[str],
                          base: Path | None = None) -> FsOptions:
    """FsOptions from `key=value` strings: the option syntax of `--shared-dir` (after PATH:TAG)
    and of `fuse-mount --option`; errors name `where` and the key."""
    values: dict[str, Any] = {"source": source, "tag": tag}

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}")

    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise error(key, "expected key=value")
        if key in values and key not in ("source", "tag"):
            raise error(key, "given twice")
        if key == "type":
            if raw != "fs":
                raise error(key, f"only type=fs is supported, got {raw!r}")
        elif key in ("timeout", "negative_timeout"):
            try:
                values[key] = float(raw)
            except ValueError:
                raise error(key, f"expected a number of seconds, got {raw!r}") from None
        elif key == "num_request_queues":
            if not raw.isdigit() or not 1 <= int(raw) <= 64:
                raise error(key, f"expected an integer between 1 and 64, got {raw!r}")
            values[key] = int(raw)
        elif key in FS_LIMIT_KEYS:
            lo, hi = LIMIT_RANGES[key]
            if not raw.isdigit() or not lo <= int(raw) <= hi:
                raise error(key, f"expected an integer between {lo} and {hi}, got {raw!r}")
            values[key] = int(raw)
        elif key == "cache":
            if raw not in ("never", "auto", "always"):
                raise error(key, f"must be one of never, auto, always, got {raw!r}")
            values[key] = raw
        elif key == "xattr_policy":
            if raw not in XATTR_POLICIES:
                raise error(key, f"must be one of {', '.join(XATTR_POLICIES)}, got {raw!r}")
            values[key] = raw
        elif key in FS_BOOL_KEYS:
            if raw not in ("true", "false"):
                raise error(key, f"expected true or false, got {raw!r}")
            values[key] = raw == "true"
        elif key in ("trace_path", *FS_IDMAP_KEYS):
            values[key] = raw
        elif key == "dax":            # DAX window
            if raw not in ("true", "false"):
                raise error(key, f"expected true or false, got {raw!r}")
            values[key] = raw == "true"
        elif key == "dax_window_mib":
            lo, hi = DAX_WINDOW_MIB_RANGE
            if not raw.isdigit() or not lo <= int(raw) <= hi:
                raise error(key, f"expected an integer between {lo} and {hi}, got {raw!r}")
            values[key] = int(raw)
        elif key == "idmap":
            if raw not in IDMAP_MODES:
                raise error(key, f"must be one of {', '.join(IDMAP_MODES)}, got {raw!r}")
            values[key] = raw
        elif key == "sandbox":
            if raw not in SANDBOX_MODES:
                raise error(key, f"must be one of {', '.join(SANDBOX_MODES)}, got {raw!r}")
            values[key] = raw
        else:
            raise error(key, f"unknown option (known: {', '.join(FS_OPTION_KEYS)})")
    return fs_options(values, error, base or Path.cwd())


def with_overrides(config: Config, *, vcpus: int | None = None, memory_mib: int | None = None,
                   script: str | None = None,
                   shared_dirs: list[FsOptions | VhostUserFsOptions] | None = None,
                   kernel: str | None = None, cmdline: str | None = None,
                   discovery: str | None = None) -> Config:
    """Apply command-line overrides, validating them like config values."""
    vm = config.vm
    if vcpus is not None:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ConfigError(f"--vcpus: must be between 1 and {MAX_VCPUS}, got {vcpus}")
        vm = replace(vm, vcpus=vcpus)
    if memory_mib is not None:
        if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
            raise ConfigError(f"--memory: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, "
                              f"got {memory_mib}")
        vm = replace(vm, memory_mib=memory_mib)
    if discovery is not None:
        vm = replace(vm, discovery=discovery)
    guest = config.guest if script is None else replace(config.guest, script=script)
    kern = config.kernel
    if kernel is not None:
        if kernel != "auto":
            kernel = str(check_path(kernel, Path.cwd(), True, False,
                                    lambda msg: ConfigError(f"--kernel: {msg}")))
        kern = replace(kern, path=kernel)
    if cmdline is not None:
        kern = replace(kern, cmdline=(kern.cmdline + " " + cmdline).strip())
    devices = config.devices + tuple(shared_dirs or ())
    _check_devices(list(devices), "command line")
    return replace(config, vm=vm, guest=guest, kernel=kern, devices=devices)


def exec_to_script(text: str) -> str:
    """`--exec 'op; op; ...'`: semicolons separate agent script lines."""
    return "\n".join(part.strip() for part in text.split(";") if part.strip()) + "\n"
