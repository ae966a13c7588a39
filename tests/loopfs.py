"""An ext4 file system on a loop device, for tests of what reaches the disk.

A share on the test machine's own disk cannot show whether data was written back: reads go
through the host's page cache either way. Here the share is an ext4 file system whose "disk" is
an image file, mounted through a loop device: what ext4 has written back is in the image, what
it has not (dirty pages, the running journal transaction) is not. Mount options keep ext4 from
writing back by itself while a test runs: ``commit=300`` (no periodic journal commit for five
minutes) and ``noauto_da_alloc`` (no writeback on close of a truncated file); the kernel's own
flusher waits ``vm.dirty_expire_centisecs`` (30 s by default) before writing dirty data.

Needs root (mount, losetup); the machines this project runs on have it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

BLOCK = 4096
MOUNT_OPTIONS = "loop,noauto_da_alloc,commit=300"


def can_mount() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def ext4_on_loop(where: Path, size_mib: int = 64) -> Iterator[tuple[Path, Path]]:
    """Yields (mount point, image file); unmounts (the loop device goes with it) at the end."""
    image, mnt = where / "disk.img", where / "mnt"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mnt)], check=True)
    try:
        yield mnt, image
    finally:
        gc.collect()  # a passthrough still holding fds on the mount keeps it busy
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            # Still busy (a test failed with fds open): detach it now, the kernel frees it and
            # its loop device when the last fd goes.
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def blocks_on_disk(image: Path, data: bytes) -> float:
    """The fraction of ``data``'s 4 KiB blocks that are in the image (file data sits in whole,
    aligned ext4 blocks; ``data`` must have distinct blocks, as guest.script.pattern has)."""
    blocks = [data[i:i + BLOCK] for i in range(0, len(data), BLOCK)]
    want = {hashlib.blake2b(b.ljust(BLOCK, b"\0"), digest_size=16).digest() for b in blocks}
    found = set()
    with open(image, "rb") as f:
        while chunk := f.read(1 << 20):
            for i in range(0, len(chunk), BLOCK):
                h = hashlib.blake2b(chunk[i:i + BLOCK], digest_size=16).digest()
                if h in want:
                    found.add(h)
    return len(found) / len(want)


def name_on_disk(image: Path, name: bytes) -> bool:
    """Whether a directory entry's name was written to the image (a directory block or the
    journal: either way it survives a crash)."""
    return name in image.read_bytes()
