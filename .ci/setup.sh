#!/usr/bin/env bash
# Every set-up step on a fresh Debian 12 machine, idempotent (fast when everything is there):
# Debian packages for the guest kernel build and the tests, a virtualenv with the project, the
# project's guest kernel and pjdfstest (each built once, cached under ~/.cache/pyvmm).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential bc bison flex libelf-dev libssl-dev xz-utils lz4   # guest kernel build
  linux-source-6.1                                               # guest kernel source
  acpica-tools                                                   # iasl: ACPI table tests
  cpio                                                           # initramfs tests
  patch linux-libc-dev                                           # patch and UAPI header tests
  qemu-system-x86 qemu-system-common                             # QEMU 7.2: vhost-user interop tests
  autoconf automake perl                                         # pjdfstest build, prove
  python3-venv python3-dev
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# The guest kernel: about 5 minutes on 2 cores the first time, then cached.
.venv/bin/python -m vmm guest build >/dev/null
# The DAX kernel variant (FUSE_DAX + ZONE_DEVICE: guest/kernel/dax.config), which `kernel: auto`
# boots only for a share with dax: true; built here so that no test builds a kernel.
.venv/bin/python -m guest.build --variant dax >/dev/null

# pjdfstest (POSIX file-system tests, run over `vmm fuse-mount`): built from the read-only shared
# copy into ~/.cache/pyvmm/pjdfstest/<hash> in a few seconds the first time, then cached.
.venv/bin/python tests/pjdfstest_support.py build >/dev/null
