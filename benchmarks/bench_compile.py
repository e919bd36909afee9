"""torch.compile of metagrad's vmapped meta-gradient vs eager and vs a hand-written torch.func vmap.

Sinusoid MLP 1-40-40-1, 25 tasks, K=10/10, 1 and 5 inner SGD steps, second order, float32,
``torch.set_num_threads(1)``. Reports the one-time compile time (first call), the steady-state
median and IQR per meta-step (interleaved rounds), the ratio to the hand-written vmap, and the
agreement of the compiled gradient with the eager one. Run it twice: the second process reuses
inductor's on-disk cache, and its compile time is the one a resumed training run pays.

Each round times a burst of ``--burst`` consecutive calls of one implementation (the mean per
call), then moves to the next: as in training, where the same meta-step repeats back to back.
``--burst 1`` alternates single calls; a sub-millisecond compiled step then runs ~2x slower
than in a loop of its own (cold caches after the other implementations' larger working sets).

Usage::

    python benchmarks/bench_compile.py [--rounds 30] [--burst 5] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import _peers
import metagrad as mg
from _workloads import MetaWorkload, sinusoid_tasks
from metagrad.models import sinusoid_mlp


def _median_iqr(ts: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ts, n=4)
    return statistics.median(ts), q[2] - q[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--burst", type=int, default=5, help="consecutive calls timed per round")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "?",
    )
    lines = [
        f"Machine: {platform.machine()} {cpu}; 1 thread; python {platform.python_version()}, "
        f"torch {torch.__version__}, metagrad {mg.__version__}; {args.rounds} interleaved rounds "
        f"of {args.burst}-call bursts",
        "",
        "| inner steps | impl | first call s | median ms | IQR ms | ratio vs hand-written vmap | max abs diff vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for steps in (1, 5):
        torch.manual_seed(0)
        model = sinusoid_mlp()
        gen = torch.Generator().manual_seed(0)
        tasks = sinusoid_tasks(25, 10, 10, gen)
        wl = MetaWorkload("sin", "", sinusoid_mlp, F.mse_loss, 0.01, steps, lambda g, t=tasks: t)
        hand = _peers.func_vmap(model, wl)
        eager = mg.MAML(model, F.mse_loss, 0.01, steps, strategy="vmap")
        comp = mg.MAML(model, F.mse_loss, 0.01, steps, strategy="vmap", compile=True)
        impls = {
            "hand-written torch.func vmap": lambda h=hand, t=tasks: h(t),
            "metagrad vmap (eager)": lambda e=eager, t=tasks: e.meta_grad(*t),
            "metagrad vmap, compile=True": lambda c=comp, t=tasks: c.meta_grad(*t),
        }
        first = {}
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - t0
        ge, gc = eager.meta_grad(*tasks), comp.meta_grad(*tasks)
        diff = max(float((ge[k] - gc[k]).abs().max()) for k in ge if ge[k] is not None)  # type: ignore[operator]
        times: dict[str, list[float]] = {n: [] for n in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                for _ in range(args.burst):
                    fn()
                times[name].append(1e3 * (time.perf_counter() - t0) / args.burst)
        ref = statistics.median(times["hand-written torch.func vmap"])
        for name in impls:
            med, iqr = _median_iqr(times[name])
            d = f"{diff:.1e}" if "compile" in name else "-"
            lines.append(
                f"| {steps} | {name} | {first[name]:.1f} | {med:.2f} | {iqr:.2f} | {med / ref:.2f}x | {d} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
