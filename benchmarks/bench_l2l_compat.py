"""The learn2learn compat layer's MAML step against metagrad's native ``meta_loss``.

Same work for every row: sinusoid MLP 1-40-40-1 (1761 params), 25 tasks, K=10 support / 10
query, 1 or 5 inner SGD steps (lr 0.01), second order, float32, one ``.backward()`` of the
mean query loss, ``torch.set_num_threads(1)``. Rows:

* ``compat clone/adapt``: ``metagrad.compat.learn2learn.algorithms.MAML``, the loop of
  learn2learn's ``examples/maml_sine.py`` (clone per task, ``adapt`` per step, sum of query
  losses, one backward).
* ``native loop``: ``metagrad.MAML(strategy="loop").meta_loss(...).backward()``: one task's graph
  at a time, the same per-task work as the compat loop.
* ``native auto``: the default strategy (``vmap`` over tasks for this MLP): what the engine does
  when it sees the whole meta-batch at once. A user's per-task Python loop cannot batch tasks,
  so this row is the ceiling, not the same work.
* ``l2l-style loop``: learn2learn's own pattern in plain PyTorch (``benchmarks/_peers.py``),
  the floor of any per-task clone/adapt implementation.

Rounds are interleaved (every row once per round, order rotated) so a load change hits all rows;
the table gives medians and IQRs in ms and the ratio of the compat row to each other row. A
float64 gate first checks that the compat and native meta-gradients agree.

Usage::

    python benchmarks/bench_l2l_compat.py [--rounds 15] [--steps 1 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import _peers
import metagrad as mg
import metagrad.compat.learn2learn as l2l
from _workloads import MetaWorkload, sinusoid_tasks
from metagrad.models import sinusoid_mlp

T, K, Q, LR = 25, 10, 10, 0.01
Step = Callable[[], None]


def compat_step(model: nn.Module, tasks: tuple[Tensor, ...], steps: int) -> Step:
    maml = l2l.algorithms.MAML(model, lr=LR, first_order=False)
    xs, ys, xq, yq = tasks

    def step() -> None:
        maml.zero_grad(set_to_none=True)
        total: Tensor | float = 0.0
        for i in range(xs.shape[0]):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.mse_loss(learner(xs[i]), ys[i]))
            total = total + F.mse_loss(learner(xq[i]), yq[i])
        (total / xs.shape[0]).backward()  # type: ignore[union-attr]

    return step


def native_step(model: nn.Module, tasks: tuple[Tensor, ...], steps: int, strategy: str) -> Step:
    learner = mg.MAML(model, F.mse_loss, inner_lr=LR, inner_steps=steps, strategy=strategy)

    def step() -> None:
        learner.zero_grad(set_to_none=True)
        learner.meta_loss(*tasks).backward()

    return step


def floor_step(model: nn.Module, tasks: tuple[Tensor, ...], steps: int) -> Step:
    wl = MetaWorkload("x", "x", sinusoid_mlp, F.mse_loss, LR, steps, lambda g: tasks)
    inner = _peers.l2l_style(model, wl)
    return lambda: inner(tasks)


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


def gate(steps: int) -> float:
    """Relative error of the compat meta-gradient against native ``meta_loss`` in float64."""
    torch.manual_seed(0)
    model = sinusoid_mlp().double()
    tasks = tuple(t.double() for t in sinusoid_tasks(T, K, Q, torch.Generator().manual_seed(1)))
    compat_step(model, tasks, steps)()
    a = _grads(model)
    native_step(model, tasks, steps, "loop")()
    b = _grads(model)
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in b) ** 0.5
    return num / den


def run(steps: int, rounds: int) -> list[str]:
    torch.manual_seed(0)
    model = sinusoid_mlp()
    tasks = sinusoid_tasks(T, K, Q, torch.Generator().manual_seed(1))
    rows: dict[str, Step] = {
        "compat clone/adapt": compat_step(model, tasks, steps),
        "native loop": native_step(model, tasks, steps, "loop"),
        "native auto (vmap)": native_step(model, tasks, steps, "auto"),
        "l2l-style loop (plain torch)": floor_step(model, tasks, steps),
    }
    names = list(rows)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for fn in rows.values():  # warm-up
        fn()
        fn()
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            rows[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
    med = {n: statistics.median(v) for n, v in samples.items()}
    err = gate(steps)
    out = [
        f"### sinusoid, {steps} inner step(s): 25 tasks, K=10/10, second order",
        "",
        f"Gate (float64): compat vs native meta-gradient, relative error {err:.1e}.",
        "",
        "| row | median ms | IQR ms | compat / row |",
        "|---|---|---|---|",
    ]
    for n in names:
        q = statistics.quantiles(samples[n], n=4)
        ratio = med["compat clone/adapt"] / med[n]
        out.append(f"| {n} | {med[n]:.2f} | {q[2] - q[0]:.2f} | {ratio:.2f}x |")
    out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Machine: {platform.platform()}, {os.cpu_count()} logical CPUs, load average at start "
        f"{load}. Python {platform.python_version()}, torch {torch.__version__}, 1 thread, "
        f"{args.rounds} interleaved rounds.",
        "",
    ]
    for s in args.steps:
        lines += run(s, args.rounds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
