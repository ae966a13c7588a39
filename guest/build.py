"""Build (or find in the cache) the project's guest kernel: an ELF vmlinux with the in-kernel agent.

Why the project builds its own kernel: on the kvm_pvm /dev/kvm guest user space cannot run and
guest kernel code runs ~1000x slower than native, so tests need a tiny kernel with a few source
patches (instructions KVM's emulator refuses) and a built-in agent (guest/agent/). Everything that
defines the kernel lives in the repo:

    guest/kernel/pyvmm.config      config fragment merged over `make tinyconfig`
    guest/kernel/patches/*.patch   source patches, applied in name order (each says why)
    guest/agent/                   the agent, copied to fs/pyvmm_agent/ in the kernel tree
    guest/kernel/<variant>.config  optional variant fragment merged on top (VARIANTS below)

The result is cached as ~/.cache/pyvmm/kernel/<hash>/vmlinux, where <hash> covers the Debian
source package version and all of the above, so a change to any of them builds a new kernel and
an unchanged checkout never rebuilds. The unpacked tree persists in ~/.cache/pyvmm/build/ so that
an agent change recompiles a few files, not the whole kernel. $PYVMM_CACHE overrides the cache root.

    python -m guest.build [--force]      (the VMM's `python -m vmm guest build` calls ensure_kernel)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BuildError", "ensure_kernel", "kernel_hash", "cached_kernel", "parse_config",
           "verify_config", "build_inputs", "cache_root"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None] | None

SOURCE_PACKAGE = "linux-source-6.1"
TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
TREE_NAME = "linux-source-6.1"        # the tarball's top-level directory
ARCH = "x86_64"                       # also makes tinyconfig 64-bit
# Bump when the recipe below changes in a way that changes the output.
RECIPE_VERSION = "2"   # 2: also builds an LZ4 bzImage
KEEP_KERNELS = 8          # cached kernels kept (other checkouts, branches and variants may want older ones)

GUEST_DIR = Path(__file__).resolve().parent
FRAGMENT = GUEST_DIR / "kernel" / "pyvmm.config"
PATCH_DIR = GUEST_DIR / "kernel" / "patches"
AGENT_DIR = GUEST_DIR / "agent"
AGENT_TREE_DIR = "fs/pyvmm_agent"
AGENT_SUFFIXES = (".c", ".h")
AGENT_FILES = ("Kconfig", "Makefile")
# Kernel variants: a fragment merged over pyvmm.config, built only when a machine needs it (its
# own cache key and its own source tree, so building it never invalidates the default kernel's
# objects). "dax": FUSE DAX and the ZONE_DEVICE/memory-hotplug code it needs, which the default
# kernel leaves out to keep boot time down.
VARIANTS: dict[str, Path] = {"dax": GUEST_DIR / "kernel" / "dax.config"}

# command or header -> Debian package that provides it
BUILD_DEPS: dict[str, str] = {
    "make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc", "patch": "patch",
    "xz": "xz-utils", "perl": "perl", "lz4": "lz4",
    "/usr/include/gelf.h": "libelf-dev", "/usr/include/openssl/opensslv.h": "libssl-dev",
}


class BuildError(RuntimeError):
    """The kernel could not be built; the message says what to do (and where the log is)."""


# ---------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class BuildInputs:
    source_version: str
    fragment: bytes
    patches: tuple[tuple[str, bytes], ...]     # (file name, contents), in apply order
    agent: tuple[tuple[str, bytes], ...]       # (file name, contents), sorted
    variant: tuple[tuple[str, bytes], ...] = ()  # (variant name, fragment), or () for the default

    def merged_fragment(self) -> bytes:
        """pyvmm.config with the variant fragment appended (later lines win in merge_config)."""
        out = self.fragment
        for _, data in self.variant:
            out = out.rstrip(b"\n") + b"\n\n" + data
        return out


def cache_root() -> Path:
    env = os.environ.get("PYVMM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyvmm"


def _agent_sources(agent_dir: Path) -> list[Path]:
    return sorted(p for p in agent_dir.iterdir()
                  if p.is_file() and (p.suffix in AGENT_SUFFIXES or p.name in AGENT_FILES))


def build_inputs(source_version: str, *, fragment: Path = FRAGMENT, patch_dir: Path = PATCH_DIR,
                 agent_dir: Path = AGENT_DIR, variant: str | None = None) -> BuildInputs:
    patches = tuple((p.name, p.read_bytes()) for p in sorted(patch_dir.glob("*.patch")))
    agent = tuple((p.name, p.read_bytes()) for p in _agent_sources(agent_dir))
    extra: tuple[tuple[str, bytes], ...] = ()
    if variant is not None:
        if variant not in VARIANTS:
            raise BuildError(f"unknown kernel variant {variant!r} (known: {', '.join(VARIANTS)})")
        extra = ((variant, VARIANTS[variant].read_bytes()),)
    return BuildInputs(source_version, fragment.read_bytes(), patches, agent, extra)


def kernel_hash(inputs: BuildInputs) -> str:
    """sha256 over everything that defines the kernel, each part length-prefixed and labelled."""
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        h.update(b"%s %d\n" % (label.encode(), len(data)))
        h.update(data)

    part("recipe", RECIPE_VERSION.encode())
    part("source", inputs.source_version.encode())
    part("arch", ARCH.encode())
    part("fragment", inputs.fragment)
    for name, data in inputs.patches:
        part("patch/" + name, data)
    for name, data in inputs.agent:
        part("agent/" + name, data)
    for name, data in inputs.variant:        # absent for the default kernel: its hash is unchanged
        part("variant/" + name, data)
    return h.hexdigest()[:24]


IMAGES = ("vmlinux", "bzImage")   # the ELF the VMM boots by default, and the boot-protocol image


def cached_kernel(digest: str, image: str = "vmlinux") -> Path:
    if image not in IMAGES:
        raise ValueError(f"unknown kernel image {image!r} (known: {', '.join(IMAGES)})")
    return cache_root() / "kernel" / digest / image


# ---------------------------------------------------------------------------------------- config

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str | None]:
    """Kconfig text -> {CONFIG_X: value, or None for '# CONFIG_X is not set'}.

    Other comments and blank lines are ignored; a malformed line raises BuildError (a typo in the
    fragment must not be silently dropped).
    """
    out: dict[str, str | None] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _SET.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = None
            continue
        if line.startswith("#"):
            continue
        raise BuildError(f"config line {n} is not CONFIG_X=v or '# CONFIG_X is not set': {raw!r}")
    return out


def verify_config(wanted: dict[str, str | None], actual: dict[str, str | None]) -> list[str]:
    """Describe every fragment option that did not end up in .config as requested.

    "n" and "is not set" are the same thing; an option missing from .config counts as not set
    (Kconfig omits options whose dependencies are off).
    """
    problems = []
    for key, want in wanted.items():
        have = actual.get(key)
        if want in (None, "n"):
            if have not in (None, "n"):
                problems.append(f"{key} wanted off, got {have}")
        elif have != want:
            problems.append(f"{key} wanted {want}, got {'off' if have is None else have}")
    return problems


# ---------------------------------------------------------------------------------------- system

def _say(progress: Progress, message: str) -> None:
    logger.info("%s", message)
    if progress is not None:
        progress(message)


def installed_version(package: str = SOURCE_PACKAGE) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}|${Version}", package],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    status, _, version = out.stdout.partition("|")
    return version if out.returncode == 0 and status.endswith(" installed") and version else None


def missing_packages() -> list[str]:
    missing = []
    if installed_version() is None or not TARBALL.exists():
        missing.append(SOURCE_PACKAGE)
    for need, pkg in BUILD_DEPS.items():
        found = Path(need).exists() if need.startswith("/") else shutil.which(need) is not None
        if not found and pkg not in missing:
            missing.append(pkg)
    return missing


def _apt_install(packages: list[str], progress: Progress) -> None:
    if os.geteuid() != 0:
        raise BuildError(f"the guest kernel build needs {' '.join(packages)}; run as root, or "
                         f"install them first: apt-get install {' '.join(packages)}")
    _say(progress, f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        upd = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (upd.stderr + res.stdout + res.stderr).strip().splitlines()[-15:]
            raise BuildError("apt-get install failed:\n" + "\n".join(tail))


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """One build at a time per cache (tests and the CLI may ask concurrently)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path, log_fh, what: str, log_path: Path) -> None:
    log_fh.write(f"\n$ {' '.join(cmd)}\n".encode())
    log_fh.flush()
    res = subprocess.run(cmd, cwd=cwd, stdout=log_fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise BuildError(f"{what} failed (exit {res.returncode}); log: {log_path}\n"
                         + _tail(log_path))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------- tree

def _prepare_tree(build_dir: Path, version: str, progress: Progress) -> Path:
    """Unpack the source package once per version; later builds reuse (and incrementally rebuild)."""
    tree = build_dir / TREE_NAME
    stamp = tree / ".pyvmm-source"
    if tree.is_dir() and stamp.exists() and stamp.read_text() == version:
        return tree
    if tree.exists():
        _say(progress, f"removing stale kernel tree {tree}")
        shutil.rmtree(tree)
    build_dir.mkdir(parents=True, exist_ok=True)
    _say(progress, f"unpacking {TARBALL} into {build_dir}")
    res = subprocess.run(["tar", "-xf", str(TARBALL), "-C", str(build_dir)],
                         capture_output=True, text=True)
    if res.returncode != 0 or not (tree / "Makefile").exists():
        raise BuildError(f"unpacking {TARBALL} failed: {res.stderr.strip()[-2000:]}")
    stamp.write_text(version)
    return tree


def _patch(tree: Path, patch: bytes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["patch", "-p1", "--batch", "--no-backup-if-mismatch", "-s", *args],
                          cwd=tree, input=patch, capture_output=True)


def _apply_patches(tree: Path, patches: tuple[tuple[str, bytes], ...], progress: Progress) -> None:
    """Bring the tree to exactly `patches`: revert recorded ones that changed, apply new ones.

    Applied patches are recorded (copies in .pyvmm-patches/) so an edited patch can be reverted
    with the text it was applied with. A tree whose state cannot be reconciled is re-unpacked.
    """
    state = tree / ".pyvmm-patches"
    state.mkdir(exist_ok=True)
    recorded = sorted(p.name for p in state.glob("*.patch"))
    wanted = dict(patches)
    # Revert (in reverse order) every recorded patch from the first one that differs on.
    keep = 0
    for name in recorded:
        if keep < len(patches) and patches[keep][0] == name and (state / name).read_bytes() == patches[keep][1]:
            keep += 1
        else:
            break
    for name in reversed(recorded[keep:]):
        _say(progress, f"reverting patch {name}")
        res = _patch(tree, (state / name).read_bytes(), "-R")
        if res.returncode != 0:
            (tree / ".pyvmm-source").unlink(missing_ok=True)   # force a fresh unpack next time
            raise BuildError(f"cannot revert {name} in {tree}: {res.stdout.decode(errors='replace')}"
                             " (the tree will be re-unpacked on the next build)")
        (state / name).unlink()
    for name, data in patches[keep:]:
        _say(progress, f"applying patch {name}")
        res = _patch(tree, data, "--forward", "--dry-run")
        if res.returncode == 0:
            res = _patch(tree, data, "--forward")
        elif _patch(tree, data, "-R", "--dry-run").returncode == 0:
            logger.info("patch %s was already applied", name)      # e.g. a hand-patched tree
            res = subprocess.CompletedProcess([], 0)
        if res.returncode != 0:
            raise BuildError(f"patch {name} does not apply to {SOURCE_PACKAGE}: "
                             f"{res.stdout.decode(errors='replace')}")
        (state / name).write_bytes(data)
    assert sorted(p.name for p in state.glob("*.patch")) == sorted(wanted)


def _sync_agent(tree: Path, agent: tuple[tuple[str, bytes], ...]) -> None:
    """Copy the agent into fs/pyvmm_agent/, touching only changed files (incremental make)."""
    dest = tree / AGENT_TREE_DIR
    dest.mkdir(exist_ok=True)
    names = {name for name, _ in agent}
    for name, data in agent:
        target = dest / name
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
    for old in dest.iterdir():
        if old.is_file() and (old.suffix in AGENT_SUFFIXES or old.name in AGENT_FILES) \
                and old.name not in names:
            old.unlink()
            old.with_suffix(".o").unlink(missing_ok=True)


def _configure(tree: Path, fragment: bytes, log_fh, log_path: Path, progress: Progress) -> None:
    _say(progress, "configuring (tinyconfig + guest/kernel/pyvmm.config)")
    frag_path = tree / ".pyvmm-fragment.config"
    frag_path.write_bytes(fragment)
    make = ["make", f"ARCH={ARCH}"]
    _run(make + ["tinyconfig"], tree, log_fh, "make tinyconfig", log_path)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", frag_path.name], tree, log_fh,
         "merge_config.sh", log_path)
    _run(make + ["olddefconfig"], tree, log_fh, "make olddefconfig", log_path)
    wanted = parse_config(fragment.decode())
    actual = parse_config((tree / ".config").read_text())
    problems = verify_config(wanted, actual)
    if problems:
        raise BuildError("these guest/kernel/*.config options did not stick (a dependency is "
                         "missing or another option selects them):\n  " + "\n  ".join(problems))


def _make_images(tree: Path, log_fh, log_path: Path, progress: Progress) -> None:
    jobs = os.cpu_count() or 1
    _say(progress, f"compiling (make -j{jobs} vmlinux bzImage; log: {log_path})")
    cmd = ["make", f"ARCH={ARCH}", f"-j{jobs}", "vmlinux", "bzImage"]
    log_fh.write(f"\n$ {' '.join(cmd)}\n".encode())
    log_fh.flush()
    started = last = time.monotonic()
    compiled = 0
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:
        log_fh.write(line)
        if line.startswith(b"  CC "):
            compiled += 1
        now = time.monotonic()
        if now - last >= 30:
            last = now
            _say(progress, f"  ... {compiled} files compiled, {now - started:.0f} s")
    rc = proc.wait()
    log_fh.flush()
    if rc != 0:
        raise BuildError(f"make failed (exit {rc}); log: {log_path}\n" + _tail(log_path))
    _say(progress, f"compiled {compiled} files in {time.monotonic() - started:.0f} s")


def _variant_of(entry: Path) -> str | None:
    try:
        return json.loads((entry / "inputs.json").read_text()).get("variant")
    except (OSError, ValueError, AttributeError):
        return None


def _prune(root: Path, keep: int = KEEP_KERNELS, variant: str | None = None) -> None:
    """Drop all but the `keep` newest cached kernels (17 MB each) of this variant and their logs.

    Counted per variant, so building the DAX kernel never evicts a default kernel in use.
    """
    kernels = sorted((d for d in (root / "kernel").iterdir()
                      if d.is_dir() and _variant_of(d) == variant),
                     key=lambda d: d.stat().st_mtime, reverse=True)
    for old in kernels[keep:]:
        logger.info("pruning old guest kernel %s", old)
        shutil.rmtree(old, ignore_errors=True)
        (root / "build" / f"build-{old.name}.log").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- entry

def ensure_kernel(progress: Progress = None, force: bool = False, image: str = "vmlinux",
                  variant: str | None = None) -> Path:
    """Return the cached guest kernel for this checkout, building it first if needed.

    `image` is "vmlinux" (the ELF the VMM boots by default: no in-guest decompression, which costs
    seconds under kvm_pvm's emulator) or "bzImage" (the Linux boot protocol image, LZ4).
    `variant` names a fragment in VARIANTS merged on top of pyvmm.config ("dax"); a variant is
    built in its own source tree (build/variant-<name>/) so the default tree stays incremental.
    """
    missing = missing_packages()
    if missing:
        _apt_install(missing, progress)
    version = installed_version()
    if version is None or not TARBALL.exists():
        raise BuildError(f"{SOURCE_PACKAGE} is not installed ({TARBALL} missing)")
    inputs = build_inputs(version, variant=variant)
    digest = kernel_hash(inputs)
    wanted = cached_kernel(digest, image)
    out = cached_kernel(digest)
    if all(cached_kernel(digest, i).exists() for i in IMAGES) and not force:
        logger.debug("guest kernel cached: %s", wanted)
        return wanted
    root = cache_root()
    build_dir = root / "build" / f"variant-{variant}" if variant else root / "build"
    # A variant has its own tree, so it takes its own lock: it never waits for a default build.
    with _build_lock(build_dir if variant else root):
        if all(cached_kernel(digest, i).exists() for i in IMAGES) and not force:
            return wanted                    # another process built it while we waited
        label = f" variant {variant}" if variant else ""
        _say(progress, f"building the guest kernel{label} {digest} ({SOURCE_PACKAGE} {version})")
        tree = _prepare_tree(build_dir, version, progress)
        log_path = build_dir / f"build-{digest}.log"
        with open(log_path, "wb") as log_fh:
            _apply_patches(tree, inputs.patches, progress)
            _sync_agent(tree, inputs.agent)
            _configure(tree, inputs.merged_fragment(), log_fh, log_path, progress)
            _make_images(tree, log_fh, log_path, progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / "arch" / ARCH / "boot" / "bzImage", out.parent / "bzImage.tmp")
        os.replace(out.parent / "bzImage.tmp", cached_kernel(digest, "bzImage"))
        tmp = out.with_name("vmlinux.tmp")
        shutil.copyfile(tree / "vmlinux", tmp)
        shutil.copyfile(tree / ".config", out.parent / "config")
        (out.parent / "inputs.json").write_text(json.dumps({
            "source_package": SOURCE_PACKAGE, "source_version": version,
            "recipe": RECIPE_VERSION, "variant": variant, "patches": [n for n, _ in inputs.patches],
            "agent": [n for n, _ in inputs.agent]}, indent=2) + "\n")
        os.replace(tmp, out)                 # vmlinux last: its presence marks a complete entry
        _prune(root, variant=variant)
        _say(progress, f"guest kernel ready: {out}")
        return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guest.build", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-hash", action="store_true", help="print the cache key and exit")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                        help="build a kernel variant (fragment merged over pyvmm.config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.print_hash:
            version = installed_version() or "unknown"
            print(kernel_hash(build_inputs(version, variant=args.variant)))
            return 0
        path = ensure_kernel(progress=lambda m: print(m, file=sys.stderr, flush=True),
                             force=args.force, variant=args.variant)
    except BuildError as exc:
        print(f"guest kernel build failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
