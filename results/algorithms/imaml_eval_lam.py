"""Test-time proximal strength of the committed iMAML checkpoints, chosen on validation.

The iMAML reference code meta-trains with ``lam`` but evaluates with ``--lam 0.0``: its test
adaptation is plain SGD on the support loss, with no proximal term. ``IMAML(eval_lam=...)`` (CLI
``--imaml-eval-lam``) selects that. This script scores each run's final checkpoint on the same
validation tasks after its test step count, adapting with the trained ``lam`` and with 0, and
writes ``results/algorithms/pilots/imaml-eval-lam-val.json``. Run from the repository root with
../shared/data/omniglot present:

    OMP_NUM_THREADS=2 python results/algorithms/imaml_eval_lam.py
"""

from __future__ import annotations

import json

import torch

from metagrad.training._evaluate import evaluate
from metagrad.training._trainer import Trainer

RUNS = (
    "omniglot-5w1s-imaml",
    "omniglot-20w1s-imaml",
    "omniglot-20w1s-imaml-l1",
    "omniglot-20w1s-imaml-d10",
    "omniglot-20w1s-imaml-l01",
)
TASKS, STEPS = 100, 16


def main() -> None:
    out: dict[str, object] = {}
    for run in RUNS:
        tr = Trainer.from_checkpoint(
            f"results/algorithms/{run}/checkpoint.pt", overrides={"data": "../shared/data/omniglot"}
        )
        sampler = tr.samplers["val"]
        start = sampler.state_dict()  # every setting sees the same validation tasks
        rows = {}
        for lam in sorted({tr.learner.lam, 0.0}, reverse=True):
            sampler.load_state_dict(start)
            tr.learner.eval_lam = lam
            r = evaluate(tr.learner, sampler, tasks=TASKS, steps=[STEPS], classification=True)
            row = r.rows[0]
            rows[f"eval_lam={lam:g}"] = {"accuracy": row.accuracy, "ci95": row.accuracy_ci95}
            print(run, lam, row.accuracy, row.accuracy_ci95, flush=True)
        out[run] = {"trained_lam": tr.learner.lam, "steps": STEPS, "tasks": TASKS, **rows}
    out["_about"] = {"split": "val", "torch": torch.__version__, "dtype": "float32"}
    with open("results/algorithms/pilots/imaml-eval-lam-val.json", "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
