"""What a workload run records next to its numbers: confidence intervals and the machine.

``results.json`` of a workload holds ``config``, ``machine`` (``lscpu``, torch version and
threads, load average), the per-seed numbers and a ``test`` block of rows
``{"name", "accuracy", "accuracy_ci95", ...}`` in the format the README quotes (checked by
``tests/test_results_recorded.py``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: normal).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("metagrad.workloads.mean_ci95: no values; pass at least one number.")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.960
    return mean, t * math.sqrt(var / n)


def accuracy_row(name: str, values: Sequence[float], **extra: Any) -> dict[str, Any]:
    """A ``test`` row: mean accuracy over seeds, its 95% interval, and the per-seed values."""
    mean, ci = mean_ci95(values)
    return {"name": name, "accuracy": mean, "accuracy_ci95": ci, "per_seed": list(values), **extra}


def quote(row: dict[str, Any]) -> str:
    """The row as the README prints it (``tests/test_results_recorded.py``'s format)."""
    return f"{100 * row['accuracy']:.2f}% ± {100 * row['accuracy_ci95']:.2f}%"


def machine() -> dict[str, Any]:
    """``lscpu``, platform, Python / torch versions, torch's thread count, the load average."""
    try:
        lscpu = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lscpu = []
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "lscpu": lscpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load,
    }


def write_results(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (with the end-of-run load average added) as indented JSON."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        payload.setdefault("machine", {})["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    return out
