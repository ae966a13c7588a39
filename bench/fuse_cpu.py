"""Host CPU per FUSE request, our server vs C virtiofsd (issue 9's name for the benchmark).

The implementation is `bench/fuse_backends.py` (issue 13's name); this entry point runs it with
the same arguments, so both names regenerate the same `bench/results/fuse_backends.json`:

    python bench/fuse_cpu.py [--rounds 2] [--size 2M] [--files 100] [--configs a,b,...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fuse_backends import main  # noqa: E402

if __name__ == "__main__":
    main()
