"""`python -m vmm ...`: see vmm/cli.py."""

import sys

from .cli import main

sys.exit(main())
