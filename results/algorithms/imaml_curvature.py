"""CG health of the committed iMAML checkpoints: does ``(1 + d) I + H / lam`` stay positive definite?

Loads each run's final checkpoint, converts the learner to float64 (so rounding cannot fake a
non-positive curvature), computes the meta-gradient of 8 training tasks with the run's own
settings and records, per task, whether CG met ``p^T A p <= 0`` (``IMAML.last_indefinite``) and
its relative residual after the run's CG budget (``IMAML.last_cg``). Run from the repository
root with ../shared/data/omniglot present:

    OMP_NUM_THREADS=2 python results/algorithms/imaml_curvature.py
"""

from __future__ import annotations

import json
import statistics
import warnings

import torch

from metagrad.training._trainer import Trainer

# (run, cg_damping to evaluate with; None = the run's own)
RUNS: tuple[tuple[str, float | None], ...] = (
    ("omniglot-5w1s-imaml", None),
    ("omniglot-20w1s-imaml", None),
    ("omniglot-20w1s-imaml-l1", None),
    ("omniglot-20w1s-imaml-l1", 10.0),  # the same checkpoint, more damping
    ("omniglot-20w1s-imaml-l1", 100.0),
    ("omniglot-20w1s-imaml-d10", None),  # trained with cg_damping 10
    ("omniglot-20w1s-imaml-l01", None),  # lambda 0.1, cg_damping 109: -d10's system x 10
)


def main() -> None:
    warnings.simplefilter("ignore")  # the indefinite-CG warning is what we count here
    out = {}
    for run, damping in RUNS:
        # from_checkpoint restores the run's RNGs and sampler state: entries of one checkpoint
        # see the same 8 training tasks, with no seed of ours
        tr = Trainer.from_checkpoint(
            f"results/algorithms/{run}/checkpoint.pt", overrides={"data": "../shared/data/omniglot"}
        )
        learner = tr.learner.double()
        if damping is not None:
            learner.cg_damping = damping
        key = run if damping is None else f"{run}@cg_damping={damping:g}"
        b = tr.samplers["train"].sample(8)
        learner.meta_grad(b.xs.double(), b.ys, b.xq.double(), b.yq)
        res = [r for _, r in learner.last_cg]
        out[key] = {
            "lam": learner.lam,
            "cg_damping": learner.cg_damping,
            "cg_steps": learner.cg_steps,
            "tasks": len(res),
            "indefinite_tasks": sum(learner.last_indefinite),
            "median_relative_residual": statistics.median(res),
            "relative_residuals": res,
        }
        print(key, out[key], flush=True)
    out["_about"] = {"dtype": "float64", "torch": torch.__version__, "split": "train"}
    with open("results/algorithms/pilots/imaml-cg-curvature.json", "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
