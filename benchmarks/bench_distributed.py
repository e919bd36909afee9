"""Meta-steps per second with 1 vs 2 processes (torchrun, gloo, 1 thread each) on this machine.

Runs ``metagrad train`` for a fixed number of iterations once on one process and once under
``torchrun --nproc_per_node=2`` and reads the training time it reports (evaluation excluded).
Workloads: sinusoid MLP (meta-batch 24; vmap and per-task loop strategies) and, when the
Omniglot zips are in ``../shared/data/omniglot``, conv-4 + BN 5-way 1-shot (meta-batch 8).

Usage::

    python benchmarks/bench_distributed.py [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"


def _time(nproc: int, args: list[str], out: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    launch = [sys.executable, "-m", "metagrad"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "metagrad",
    ]  # fmt: skip
    common = [
        "--eval-tasks",
        "10",
        "--val-every",
        "100000",
        "--checkpoint-every",
        "100000",
        "--no-progress",
        "--no-plots",
    ]
    res = subprocess.run(
        [*launch, *args, *common, "--output", out],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-1500:])
    m = re.search(r"\(([0-9.]+) s training\)", res.stdout)
    if m is None:
        raise RuntimeError(f"no training time in output: {res.stdout[-500:]}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()
    work = [
        (
            "sinusoid MLP, meta-batch 24, strategy vmap",
            ["train", "sinusoid", "--meta-batch", "24", "--iterations", "400"],
            400,
        ),
        (
            "sinusoid MLP, meta-batch 24, strategy loop",
            [
                "train",
                "sinusoid",
                "--meta-batch",
                "24",
                "--iterations",
                "100",
                "--strategy",
                "loop",
            ],
            100,
        ),
    ]
    if OMNIGLOT.is_dir():
        work.append(
            (
                "conv-4 + BN Omniglot 5-way 1-shot, meta-batch 8",
                [
                    "train",
                    "omniglot",
                    "--data",
                    str(OMNIGLOT),
                    "--meta-batch",
                    "8",
                    "--iterations",
                    "10",
                ],
                10,
            )
        )
    lines = ["| workload | 1 process it/s | 2 processes it/s | speed-up |", "|---|---|---|---|"]
    with TemporaryDirectory() as tmp:
        for i, (name, args, iters) in enumerate(work):
            t1 = _time(1, args, f"{tmp}/{i}-one")
            t2 = _time(2, args, f"{tmp}/{i}-two")
            lines.append(f"| {name} | {iters / t1:.2f} | {iters / t2:.2f} | {t1 / t2:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
