"""Dataset distillation (Wang et al. 2018) on scikit-learn's digits.

Learns ``images_per_class`` synthetic 8x8 images per class and one learning rate per inner
step, so that a freshly initialized 64-64-10 MLP trained for 10 steps on the synthetic images
alone classifies real digits. Scored on the test split by 20 unseen initializations (mean with
a 95% interval), against the same 10 steps on as many random real training images (a new draw
per initialization), on the class-mean images (1 per class) and on the whole training set,
each of these with the best fixed learning rate on the validation split. Saves the images as
a PNG grid (one column per class).

    pip install -e .[workloads]
    OMP_NUM_THREADS=1 python examples/distill.py --images-per-class 1 10 --output results/digits-distill
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch
from _report import write_and_print

from metagrad.workloads import (
    DistillConfig,
    Split,
    accuracy,
    accuracy_row,
    distill,
    evaluate_distilled,
    load_digits,
    machine,
    quote,
    save_image_grid,
    train_on,
)

LR_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
EVAL_SEEDS = range(10_000, 10_020)  # never drawn while distilling


def best_fixed_lr(
    images: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig, val: Split
) -> float:
    """The grid learning rate with the best mean validation accuracy (5 initializations)."""

    def score(lr: float) -> float:
        lrs = torch.full((cfg.inner_steps,), lr, dtype=images.dtype)
        return sum(
            accuracy(train_on(images, labels, lrs, cfg, seed=s, n_classes=10), val.x, val.y)
            for s in range(20_000, 20_005)
        )

    return max(LR_GRID, key=score)


def random_real(train: Split, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random training images per class, labels sorted by class."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat(
        [
            torch.nonzero(train.y == c).flatten()[
                torch.randperm(int((train.y == c).sum()), generator=g)[:ipc]
            ]
            for c in range(10)
        ]
    )
    return train.x[idx], train.y[idx]


def baseline(
    pick: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    cfg: DistillConfig,
    val: Split,
    test: Split,
) -> tuple[list[float], float]:
    """Test accuracy over ``EVAL_SEEDS`` of 10 steps on ``pick(seed)`` at the best fixed lr."""
    x0, y0 = pick(0)
    lr = best_fixed_lr(x0, y0, cfg, val)
    lrs = torch.full((cfg.inner_steps,), lr, dtype=x0.dtype)
    accs = []
    for s in EVAL_SEEDS:
        x, y = pick(s)
        accs.append(accuracy(train_on(x, y, lrs, cfg, seed=s, n_classes=10), test.x, test.y))
    return accs, lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-class", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--outer-lr", type=float, default=0.01)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--output", default="results/digits-distill")
    args = ap.parse_args()
    info = machine()
    data = load_digits(1000, 300, seed=0)
    rows, runs = [], {}
    for ipc in args.images_per_class:
        cfg = DistillConfig(
            images_per_class=ipc,
            inner_steps=args.inner_steps,
            iterations=args.iterations,
            outer_lr=args.outer_lr,
            strategy=args.strategy,
        )
        first = len(rows)
        t0 = time.perf_counter()
        res = distill(data.train, cfg, seed=0)
        wall = time.perf_counter() - t0
        accs = evaluate_distilled(res.images, res.labels, res.lrs, cfg, data.test, seeds=EVAL_SEEDS)
        png = save_image_grid(res.images, f"{args.output}/synthetic_{ipc}ipc.png", n_classes=10)
        rows.append(
            accuracy_row(
                f"distilled, {ipc} image(s) per class, learned step sizes",
                accs,
                method="distilled",
                images_per_class=ipc,
                wall_time_s=wall,
                learned_lrs=[float(v) for v in res.lrs],
                image_grid=png.name,
            )
        )
        real, lr = baseline(
            lambda s, ipc=ipc: random_real(data.train, ipc, s), cfg, data.val, data.test
        )
        rows.append(
            accuracy_row(
                f"random real, {ipc} image(s) per class",
                real,
                method="random_real",
                images_per_class=ipc,
                fixed_lr=lr,
            )
        )
        if ipc == 1:
            means = torch.stack([data.train.x[data.train.y == c].mean(0) for c in range(10)])
            mean_accs, lr = baseline(
                lambda s, m=means: (m, torch.arange(10)), cfg, data.val, data.test
            )
            rows.append(
                accuracy_row(
                    "class-mean images, 1 per class",
                    mean_accs,
                    method="class_means",
                    images_per_class=1,
                    fixed_lr=lr,
                )
            )
        runs[ipc] = {
            "outer_loss_every_50": [
                sum(res.outer_losses[i : i + 50]) / len(res.outer_losses[i : i + 50])
                for i in range(0, len(res.outer_losses), 50)
            ]
        }
        print(f"{ipc} per class: distilled {quote(rows[first])} in {wall:.0f} s", flush=True)
    cfg = DistillConfig(inner_steps=args.inner_steps)
    full, lr = baseline(lambda s: (data.train.x, data.train.y), cfg, data.val, data.test)
    rows.append(
        accuracy_row(
            f"all {len(data.train.y)} real training images (reference)",
            full,
            method="full",
            images_per_class=len(data.train.y) // 10,
            fixed_lr=lr,
        )
    )
    payload = {
        "workload": "dataset distillation (digits)",
        "command": "OMP_NUM_THREADS=1 python examples/distill.py --images-per-class "
        f"{' '.join(map(str, args.images_per_class))} --output {args.output}",
        "config": {
            **{
                k: v
                for k, v in dataclasses.asdict(DistillConfig()).items()
                if k != "images_per_class"
            },
            "images_per_class": args.images_per_class,
            "iterations": args.iterations,
            "inner_steps": args.inner_steps,
            "outer_lr": args.outer_lr,
            "strategy": args.strategy,
            "n_train": 1000,
            "n_val": 300,
            "n_test": len(data.test.y),
            "eval_inits": len(EVAL_SEEDS),
            "fixed_lr_grid": list(LR_GRID),
            "model": "MLP 64-64-10, ReLU, a fresh random initialization for every evaluation",
        },
        "machine": info,
        "test": {"metric": "accuracy", "inits": len(EVAL_SEEDS), "rows": rows},
        "runs": {str(k): v for k, v in runs.items()},
    }
    write_and_print(
        args.output,
        payload,
        ("trained on (10 steps)", "test accuracy", "learning rate"),
        lambda r: (
            r["name"],
            quote(r),
            "learned per step"
            if r["method"] == "distilled"
            else f"{r['fixed_lr']:g} (best on val)",
        ),
    )


if __name__ == "__main__":
    main()
