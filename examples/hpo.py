"""Hyperparameter optimization on scikit-learn's digits: hypergradients against a grid search.

Per-layer learning rates and weight decays of a 64-64-64-10 MLP (100 full-batch steps of SGD
with momentum 0.9) are learned by hypergradient descent on the validation loss; a grid search
over one shared learning rate and weight decay gets the same number of training runs. Each
method keeps its run with the lowest validation loss; its test accuracy is reported, as the
mean over seeds (each seed: another stratified split and initialization) with a 95% interval.

    pip install -e .[workloads]
    OMP_NUM_THREADS=1 python examples/hpo.py --seeds 5 --output results/digits-hpo
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from _report import write_and_print

from metagrad.workloads import (
    HPOConfig,
    accuracy_row,
    grid_search,
    load_digits,
    machine,
    mean_ci95,
    quote,
    tune_hyperparameters,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--inner-steps", type=int, default=HPOConfig.inner_steps)
    ap.add_argument("--hyper-lr", type=float, default=0.3)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--output", default="results/digits-hpo")
    args = ap.parse_args()
    config = HPOConfig(inner_steps=args.inner_steps, hyper_lr=args.hyper_lr, strategy=args.strategy)
    info = machine()
    per_seed = []
    times = {"hypergradient": 0.0, "grid": 0.0}
    for seed in range(args.seeds):
        data = load_digits(args.n_train, args.n_val, seed=seed)
        t0 = time.perf_counter()
        hgd = tune_hyperparameters(*data, config, seed=seed)
        t1 = time.perf_counter()
        grid = grid_search(*data, config, seed=seed)
        t2 = time.perf_counter()
        times["hypergradient"] += t1 - t0
        times["grid"] += t2 - t1
        per_seed.append({"seed": seed, "hypergradient": hgd.to_dict(), "grid": grid.to_dict()})
        print(
            f"seed {seed}: hypergradient val {hgd.best.val_accuracy:.4f} test "
            f"{hgd.best.test_accuracy:.4f} ({t1 - t0:.1f} s) | grid val "
            f"{grid.best.val_accuracy:.4f} test {grid.best.test_accuracy:.4f} ({t2 - t1:.1f} s)",
            flush=True,
        )
    rows = []
    for method, label in (
        ("hypergradient", "hypergradient descent, per-layer lr and wd"),
        ("grid", "grid search, shared lr and wd"),
    ):
        best = [s[method]["best"] for s in per_seed]
        val = mean_ci95([b["val_accuracy"] for b in best])
        loss = mean_ci95([b["val_loss"] for b in best])
        rows.append(
            accuracy_row(
                label,
                [b["test_accuracy"] for b in best],
                method=method,
                val_accuracy=val[0],
                val_accuracy_ci95=val[1],
                val_loss=loss[0],
                val_loss_ci95=loss[1],
                training_runs=config.runs,
                wall_time_s=times[method],
            )
        )
    payload = {
        "workload": "hyperparameter optimization (digits)",
        "command": "OMP_NUM_THREADS=1 python examples/hpo.py --seeds "
        f"{args.seeds} --output {args.output}",
        "config": {
            **dataclasses.asdict(config),
            "runs": config.runs,
            "seeds": args.seeds,
            "n_train": args.n_train,
            "n_val": args.n_val,
            "n_test": len(load_digits(args.n_train, args.n_val).test.y),
            "model": f"MLP 64-{'-'.join(map(str, config.hidden))}-10, ReLU",
            "selection": "the run with the lowest validation loss",
        },
        "machine": info,
        "test": {"metric": "accuracy", "seeds": args.seeds, "rows": rows},
        "per_seed": per_seed,
    }
    write_and_print(
        args.output,
        payload,
        ("method", "training runs", "val accuracy", "test accuracy", "wall time"),
        lambda r: (
            r["name"],
            str(r["training_runs"]),
            f"{100 * r['val_accuracy']:.2f}% ± {100 * r['val_accuracy_ci95']:.2f}%",
            quote(r),
            f"{r['wall_time_s']:.0f} s",
        ),
    )


if __name__ == "__main__":
    main()
