"""Learning to reweight examples (Ren et al. 2018) on scikit-learn's digits with 40% label noise.

1,000 training images, 40% of their labels changed to another class at random (symmetric
noise); a clean set of 100 (10 per class) whose loss drives the per-example weights of every
mini-batch through a one-step lookahead hypergradient; clean test accuracy of a 64-128-128-10
MLP after the same SGD budget, against plain training on the noisy set, on the noisy set plus
the clean set, and on the clean set alone. Mean over seeds (split, noise, init, batch order)
with a 95% interval; the final model of each run is scored (no early stopping), and, for
reference, plain training stopped at its best clean-set accuracy.

    pip install -e .[workloads]
    OMP_NUM_THREADS=1 python examples/reweight.py --seeds 5 --output results/digits-reweight
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from _report import write_and_print

from metagrad.workloads import (
    ReweightConfig,
    Split,
    accuracy,
    accuracy_row,
    load_digits,
    machine,
    quote,
    symmetric_noise,
    train_plain,
    train_reweighted,
)


def one_seed(seed: int, args: argparse.Namespace, config: ReweightConfig) -> dict[str, Any]:
    """Every method on one seed's split, noise, initialization and batch order."""
    data = load_digits(args.n_train, args.n_clean, seed=seed)
    noisy = Split(data.train.x, symmetric_noise(data.train.y, args.noise, n_classes=10, seed=seed))
    clean, test = data.val, data.test
    both = Split(torch.cat([noisy.x, clean.x]), torch.cat([noisy.y, clean.y]))
    curves: dict[str, list[float]] = {"reweighted": [], "plain_noisy": []}
    on_clean: list[float] = []  # plain_noisy's clean-set accuracy per epoch

    def watch(name: str) -> Callable[[int, dict[str, torch.Tensor]], None]:
        def cb(epoch: int, w: dict[str, torch.Tensor]) -> None:
            curves[name].append(accuracy(w, test.x, test.y))
            if name == "plain_noisy":
                on_clean.append(accuracy(w, clean.x, clean.y))

        return cb

    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "reweighted": lambda: train_reweighted(
            noisy, clean, config, seed=seed, on_epoch=watch("reweighted")
        ),
        "plain_noisy": lambda: train_plain(noisy, config, seed=seed, on_epoch=watch("plain_noisy")),
        "plain_noisy_clean": lambda: train_plain(both, config, seed=seed),
        "plain_clean": lambda: train_plain(clean, config, seed=seed),
    }
    scores: dict[str, tuple[float, float]] = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        w = fn()
        scores[name] = (accuracy(w, test.x, test.y), time.perf_counter() - t0)
    # The earliest epoch with the best clean-set accuracy (the clean set as a validation set).
    best = max(range(len(on_clean)), key=lambda i: (on_clean[i], -i))
    scores["plain_early"] = (curves["plain_noisy"][best], 0.0)
    return {"scores": scores, "curves": curves, "early_epoch": best + 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-clean", type=int, default=100)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--output", default="results/digits-reweight")
    args = ap.parse_args()
    config = ReweightConfig(epochs=args.epochs, lr=args.lr, strategy=args.strategy)
    info = machine()
    methods = ("reweighted", "plain_noisy", "plain_noisy_clean", "plain_clean", "plain_early")
    acc: dict[str, list[float]] = {m: [] for m in methods}
    times: dict[str, float] = {m: 0.0 for m in methods}
    curves: list[dict[str, list[float]]] = []
    for seed in range(args.seeds):
        out = one_seed(seed, args, config)
        for name, (a, t) in out["scores"].items():
            acc[name].append(a)
            times[name] += t
        curves.append(out["curves"])
        print(
            f"seed {seed}: "
            + " ".join(f"{k} {a:.4f}" for k, (a, _) in out["scores"].items())
            + f" (early stop at epoch {out['early_epoch']})",
            flush=True,
        )
    labels = {
        "reweighted": "learning to reweight (noisy set, weights from the clean set)",
        "plain_noisy": "plain SGD on the noisy set",
        "plain_noisy_clean": "plain SGD on the noisy set + the clean set",
        "plain_clean": "plain SGD on the clean set only",
        "plain_early": "plain SGD on the noisy set, stopped at its best clean-set accuracy",
    }
    rows = [accuracy_row(labels[m], acc[m], method=m, wall_time_s=times[m]) for m in methods]
    payload = {
        "workload": "learning to reweight examples (digits, 40% symmetric label noise)",
        "command": f"OMP_NUM_THREADS=1 python examples/reweight.py --seeds {args.seeds} "
        f"--output {args.output}",
        "config": {
            **dataclasses.asdict(config),
            "seeds": args.seeds,
            "n_train": args.n_train,
            "n_clean": args.n_clean,
            "noise": args.noise,
            "noise_kind": "symmetric: a corrupted label is uniform over the other 9 classes",
            "n_test": len(load_digits(args.n_train, args.n_clean).test.y),
            "model": f"MLP 64-{'-'.join(map(str, config.hidden))}-10, ReLU",
            "scored": "the model after the last epoch (plain_early: best clean-set epoch)",
        },
        "machine": info,
        "test": {"metric": "accuracy", "seeds": args.seeds, "rows": rows},
        "test_accuracy_per_epoch": curves,
    }
    write_and_print(
        args.output,
        payload,
        ("training", "clean test accuracy", "wall time (all seeds)"),
        lambda r: (
            r["name"],
            quote(r),
            "" if r["method"] == "plain_early" else f"{r['wall_time_s']:.0f} s",
        ),
    )


if __name__ == "__main__":
    main()
