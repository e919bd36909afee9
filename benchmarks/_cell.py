"""One benchmark cell in a fresh one-thread Python process (so it has its own peak RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_cell(module: str, *args: Any) -> tuple[Any, str | None]:
    """``benchmarks/<module>.py``'s ``_cell(*args)`` in a child with ``OMP_NUM_THREADS=1``.

    Returns ``(its JSON result, None)``, or ``(None, the last line of its stderr)`` if it failed.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = (
        f"import json, sys; sys.path.insert(0, 'benchmarks'); import {module} as b; "
        f"print(json.dumps(b._cell({', '.join(map(repr, args))})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1]
    return json.loads(out.stdout.strip().splitlines()[-1]), None
