"""`torchrun --nproc_per_node=2 -m metagrad train ...` ends where the single-process run ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ARGS = [
    "train", "sinusoid", "--iterations", "20", "--meta-batch", "5", "--eval-tasks", "5",
    "--val-every", "10", "--val-tasks", "4", "--checkpoint-every", "10", "--no-progress", "--no-plots",
]  # fmt: skip


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def _params(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    state = ckpt["learner"] if "learner" in ckpt else ckpt["model"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_torchrun_two_ranks_match_single_process(tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(
        [sys.executable, "-m", "metagrad", *ARGS, "--output", str(single)],
        env=_env(),
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "metagrad", *ARGS, "--output", str(multi)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("query MSE") == 1  # only rank 0 reports
    a, b = _params(single), _params(multi)
    assert a.keys() == b.keys()
    for k in a:  # float32: shard sums round differently than one sum
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
