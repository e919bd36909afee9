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


def _run(args: list[str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "metagrad", *args], env=_env(), check=True, capture_output=True
    )


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "metagrad", *args],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # float32: shard sums round differently than one sum
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_torchrun_two_ranks_match_single_process(tmp_path: Path) -> None:
    single, multi, resumed = tmp_path / "single", tmp_path / "multi", tmp_path / "resumed"
    _run([*ARGS, "--output", str(single)])
    out = _torchrun([*ARGS, "--output", str(multi)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("query MSE") == 1  # only rank 0 reports
    _close(_params(single), _params(multi))
    # Resume with a different world size: 10 iterations on 1 process, the last 10 on 2.
    _run([*ARGS[:2], "--iterations", "10", *ARGS[4:], "--output", str(resumed)])
    out = _torchrun([*ARGS, "--output", str(resumed), "--resume"])
    assert out.returncode == 0, out.stderr[-2000:]
    _close(_params(single), _params(resumed))


def test_torchrun_world_larger_than_meta_batch_is_refused(tmp_path: Path) -> None:
    out = _torchrun([*ARGS[:4], "--meta-batch", "1", *ARGS[6:], "--output", str(tmp_path / "r")])
    assert out.returncode != 0
    assert "smaller than the world size 2" in out.stderr
