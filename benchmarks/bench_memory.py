"""Memory and time of exact second order vs inner steps, per strategy (issue: constant memory).

For each (workload, strategy, inner steps) cell a FRESH subprocess builds the model and one
meta-batch, records ``ru_maxrss``, runs one meta-step (``meta_loss(...).backward()``), and
reports the growth of the peak resident set (MB), then the median time of ``repeats`` further
meta-steps (the first, measured step is a warm-up for timing).
Single-threaded (``torch.set_num_threads(1)``), float32.

Strategies: ``default`` (what ``MAML`` picks: the vmapped create_graph path on the MLPs, the
per-task loop on conv-4 + BatchNorm), ``create_graph`` (per-task loop, the classic unrolled
second order), ``hvp_chain``
(backward HVP chain from stored iterates), ``checkpoint`` (sqrt(K) stored iterates),
``imaml`` (implicit gradient, CG 5 steps, lambda 1), ``first_order`` (FOMAML loop).

Usage::

    python benchmarks/bench_memory.py                  # full grid (~10 minutes on 1 core)
    python benchmarks/bench_memory.py --quick          # small grid, for a smoke run
    python benchmarks/bench_memory.py --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import time

from _cell import run_cell

STRATEGIES = ("default", "create_graph", "hvp_chain", "checkpoint", "imaml", "first_order")


def _cell(workload: str, strategy: str, steps: int, repeats: int) -> dict[str, float]:
    """Runs in the child process."""
    import torch
    import torch.nn.functional as F

    import metagrad as mg
    from metagrad.models import conv4, sinusoid_mlp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # torch.autograd.grad(grad_outputs=...) imports torch.fx's symbolic shapes (sympy, ~40 MB)
    # on first use: a one-time library cost, not activation memory, so load it up front.
    import torch.fx.experimental.symbolic_shapes

    if workload == "sinusoid":
        model = sinusoid_mlp()
        T, K = 25, 10
        amp, phase = torch.rand(T, 1, 1) * 4.9 + 0.1, torch.rand(T, 1, 1) * torch.pi
        xs, xq = torch.rand(T, K, 1) * 10 - 5, torch.rand(T, K, 1) * 10 - 5
        ys, yq = amp * torch.sin(xs - phase), amp * torch.sin(xq - phase)
        loss_fn, lr = F.mse_loss, 0.01
    elif workload == "wide":
        # activations dominate: 2 tasks x 4,000 support points through 512-wide layers
        # (16 MB of activations per task and step against 1.2 MB of parameters)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512),
            torch.nn.Tanh(), torch.nn.Linear(512, 1),
        )  # fmt: skip
        xs, xq = torch.randn(2, 4000, 64), torch.randn(2, 4000, 64)
        ys, yq = torch.randn(2, 4000, 1), torch.randn(2, 4000, 1)
        loss_fn, lr = F.mse_loss, 0.01
    else:
        model = conv4(n_way=5, hidden=64)
        T = 8
        xs, xq = torch.rand(T, 5, 1, 28, 28), torch.rand(T, 75, 1, 28, 28)
        ys = torch.arange(5).repeat(T, 1)
        yq = torch.arange(5).repeat_interleave(15).repeat(T, 1)
        loss_fn, lr = F.cross_entropy, 0.1
    if strategy == "imaml":
        learner: torch.nn.Module = mg.IMAML(
            model, loss_fn, inner_lr=lr, inner_steps=steps, lam=1.0, cg_steps=5
        )
    else:
        order = 1 if strategy == "first_order" else 2
        strat = {"create_graph": "loop", "first_order": "loop", "default": "auto"}.get(
            strategy, strategy
        )
        learner = mg.MAML(
            model, loss_fn, inner_lr=lr, inner_steps=steps, order=order, strategy=strat
        )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    learner.meta_loss(xs, ys, xq, yq).backward()  # type: ignore[operator]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        model.zero_grad()
        t0 = time.perf_counter()
        learner.meta_loss(xs, ys, xq, yq).backward()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return {"peak_mb": (after - before) / 1024.0, "ms": 1000 * statistics.median(times)}


def _mb_ms(r: dict[str, float]) -> str:
    """One table cell: ``MB / ms``, or why the cell has no numbers."""
    if math.isnan(r["ms"]):
        return "not run (~6 GB)" if "error" not in r else "failed"
    return f"{r['peak_mb']:.1f} / {r['ms']:.0f}"


def _run_cell(workload: str, strategy: str, steps: int, repeats: int) -> dict[str, float]:
    res, err = run_cell("bench_memory", workload, strategy, steps, repeats)
    if err is not None:
        return {"peak_mb": float("nan"), "ms": float("nan"), "error": err}  # type: ignore[dict-item]
    return res  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="one workload: sinusoid, conv4 or wide")
    args = ap.parse_args()
    import torch

    import metagrad

    grid = {"sinusoid": [1, 5, 25, 100], "conv4": [1, 8, 32, 100], "wide": [1, 8, 32, 100]}
    repeats = {"sinusoid": 3, "conv4": 2, "wide": 1}
    if args.quick:
        grid, repeats = {"sinusoid": [1, 5], "conv4": [1]}, {"sinusoid": 2, "conv4": 1}
    if args.only:
        grid = {args.only: grid[args.only]}
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "?",
    )
    header = (
        f"machine: {platform.machine()} {cpu}, {os.cpu_count()} cores; 1 thread; python "
        f"{platform.python_version()}, torch {torch.__version__}, metagrad {metagrad.__version__}"
    )
    print(header, flush=True)
    results: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for workload, steps_list in grid.items():
        results[workload] = {s: {} for s in STRATEGIES}
        for steps in steps_list:
            for strategy in STRATEGIES:
                keeps_graph = strategy in ("create_graph", "default")
                if workload == "conv4" and strategy == "create_graph":
                    r = results[workload]["default"][steps]  # the default is this loop here
                elif workload == "wide" and keeps_graph and steps > 32:
                    r = {"peak_mb": float("nan"), "ms": float("nan")}  # ~6 GB: not run
                else:
                    r = _run_cell(workload, strategy, steps, repeats[workload])
                results[workload][strategy][steps] = r
                print(
                    f"{workload:8s} K={steps:3d} {strategy:12s} peak +{r['peak_mb']:8.1f} MB  {r['ms']:10.1f} ms",
                    flush=True,
                )
    lines = [header, ""]
    for workload, steps_list in grid.items():
        desc = {
            "sinusoid": "sinusoid MLP 1-40-40-1, 25 tasks, K=10/10",
            "conv4": "conv-4 (64, BN) 5-way 1-shot, 15 query/class, 8 tasks",
            "wide": "wide tanh MLP 64-512-512-1, 2 tasks, 4,000 support / 4,000 query points",
        }[workload]
        lines += [
            f"### {desc}",
            "",
            "| strategy | " + " | ".join(f"K={k} MB / ms" for k in steps_list) + " |",
            "|---|" + "---|" * len(steps_list),
        ]
        for strategy in STRATEGIES:
            cells = [_mb_ms(results[workload][strategy][k]) for k in steps_list]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        fo = results[workload]["first_order"]
        lines += ["", "Ratios to first order (memory) and to the default strategy (time):", ""]
        lines += [
            "| strategy | " + " | ".join(f"K={k} mem/FO, time/default" for k in steps_list) + " |",
            "|---|" + "---|" * len(steps_list),
        ]
        for strategy in ("hvp_chain", "checkpoint", "imaml"):
            cells = []
            for k in steps_list:
                r, f, c = (
                    results[workload][strategy][k],
                    fo[k],
                    results[workload]["default"][k],
                )
                time_ratio = "—" if math.isnan(c["ms"]) else f"{r['ms'] / c['ms']:.2f}x"
                cells.append(f"{r['peak_mb'] / max(f['peak_mb'], 1e-9):.2f}x, {time_ratio}")
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
