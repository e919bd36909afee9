"""``python -m metagrad``: same as the ``metagrad`` console script."""

from __future__ import annotations

import sys

from metagrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
