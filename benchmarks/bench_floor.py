"""How far the conv-4 second-order meta-step is from its arithmetic floor (issue #6).

For the ``conv4-bn-8tasks`` workload of ``bench_meta.py`` (conv-4 + BatchNorm, 64 filters,
5-way 1-shot, 15 queries per class, 8 tasks, 1 inner SGD step):

* FLOPs of one second-order meta-step and of one plain forward+backward over the same
  8 x (5 + 75) = 640 images (per task, so BatchNorm sees the same batches), counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; elementwise ops and
  reductions are not counted, so the floor below is a lower bound);
* the machine's single-thread fp32 GEMM rate (median of 1024 x 1024 x 1024 products);
* floor = meta-step FLOPs / GEMM rate;
* interleaved rounds of: forward+backward (NCHW, NHWC), the plain per-task loop (NCHW, the
  seeds' style), metagrad's default (``MAML(...).meta_grad``, NHWC on CPU), and the lever
  ablation: metagrad NHWC without its two template rewrites (ReLU/max-pool order, batch-stats
  BatchNorm double backward), with only one of them, and with ``memory_format="preserve"``
  (NCHW, rewrites on). Reported: median time, ratio to the plain loop, fraction of the floor
  reached, and the overhead ratio meta-step / forward+backward in the same layout (goal <= 1.3).

``--n-way 20 --queries 5`` gives the 20-way 1-shot training shape (support 20 images), where
the BatchNorm rewrite matters most. Single thread (``torch.set_num_threads(1)``), float32.
Usage::

    python benchmarks/bench_floor.py [--rounds 7] [--n-way 5 --queries 15 --tasks 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

import metagrad as mg
import metagrad.functional._rewrites as fm_module
from _peers import _nhwc, plain_loop
from _workloads import image_tasks, meta_workloads, peer_copy
from metagrad.models import conv4


def gemm_gflops(n: int = 1024, rounds: int = 15) -> float:
    """Median single-thread fp32 GEMM rate (GFLOP/s) of an n x n x n product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def fwd_bwd(model: nn.Module, tasks: tuple[Tensor, ...], prep: Callable[[Tensor], Tensor]):
    """Plain forward + backward over each task's support and query images as one batch."""
    xs, ys, xq, yq = tasks
    loss_fn = torch.nn.functional.cross_entropy
    params = dict(model.named_parameters())

    def run() -> None:
        for i in range(xs.shape[0]):
            x, y = prep(torch.cat([xs[i], xq[i]])), torch.cat([ys[i], yq[i]])
            loss = loss_fn(functional_call(model, params, (x,)), y)
            torch.autograd.grad(loss, list(params.values()))

    return run


def flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--queries", type=int, default=15, help="query images per class")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="write the table as markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    wl = next(w for w in meta_workloads(quick=True) if w.name == "conv4-bn-8tasks")
    n, q, n_tasks = args.n_way, args.queries, args.tasks
    wl.make_model = lambda: conv4(n_way=n, hidden=64, image_size=28)
    wl.make_tasks = lambda g: image_tasks(n_tasks, n, 1, q, 28, g)
    model, tasks = wl.build(torch.float32)
    print(f"conv-4 + BN, {n}-way 1-shot, {q} queries per class, {n_tasks} tasks, 1 inner step")

    def same(x: Tensor) -> Tensor:
        return x

    def learner(pool: bool, bn: bool, memory_format: str = "auto") -> Callable[[], object]:
        """metagrad's default MAML, optionally without one or both template rewrites."""
        keep = fm_module.pool_before_relu, fm_module.use_batch_stats_norm
        if not pool:
            fm_module.pool_before_relu = lambda m: 0
        if not bn:
            fm_module.use_batch_stats_norm = lambda m: 0
        try:
            ln = mg.MAML(
                peer_copy(model), wl.loss_fn, wl.inner_lr, wl.steps, memory_format=memory_format
            )
        finally:
            fm_module.pool_before_relu, fm_module.use_batch_stats_norm = keep
        return lambda: ln.meta_grad(*tasks)

    plain = plain_loop(peer_copy(model), wl)
    cases: dict[str, Callable[[], object]] = {
        "forward+backward NCHW": fwd_bwd(peer_copy(model), tasks, same),
        "forward+backward NHWC": fwd_bwd(peer_copy(model), tasks, _nhwc),
        "plain loop (NCHW)": lambda: plain(tasks),
        "metagrad memory_format=preserve (NCHW)": learner(True, True, "preserve"),
        "metagrad NHWC, no rewrites": learner(False, False),
        "metagrad NHWC + pool-before-ReLU": learner(True, False),
        "metagrad NHWC + batch-stats BN": learner(False, True),
        "metagrad default (NHWC + both)": learner(True, True),
    }
    meta_flops = flops_of(cases["plain loop (NCHW)"])
    fb_flops = flops_of(cases["forward+backward NCHW"])
    rate = gemm_gflops()
    floor_s = meta_flops / (rate * 1e9)
    print(f"torch {torch.__version__}, 1 thread; GEMM 1024^3 fp32: {rate:.1f} GFLOP/s")
    print(f"meta-step FLOPs {meta_flops / 1e9:.1f} G; forward+backward {fb_flops / 1e9:.1f} G")
    print(f"floor (meta FLOPs / GEMM rate): {floor_s * 1e3:.0f} ms\n")

    for fn in cases.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):  # interleaved: drift hits every case alike
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = {"NCHW": med["forward+backward NCHW"], "NHWC": med["forward+backward NHWC"]}
    plain_s = med["plain loop (NCHW)"]
    print(
        f"{'case':42s} {'median ms':>10s} {'vs plain loop':>14s} {'of floor':>9s} {'/ fwd+bwd':>10s}"
    )
    rows = []
    for name, m in med.items():
        layout = "NHWC" if "NHWC" in name else "NCHW"
        over = m / base[layout]
        rows.append(
            {
                "case": name,
                "median_ms": m * 1e3,
                "samples_ms": [s * 1e3 for s in samples[name]],
                "vs_plain_loop": m / plain_s,
                "floor_fraction": floor_s / m,
                "over_fwd_bwd_same_layout": over,
            }
        )
        print(f"{name:42s} {m * 1e3:10.0f} {m / plain_s:13.2f}x {floor_s / m:8.0%} {over:9.2f}x")
    load = os.getloadavg()
    print(f"\nload average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.markdown:
        lines = [
            f"conv-4 + BN, {n}-way 1-shot, {q} queries per class, {n_tasks} tasks, 1 inner step; "
            f"{platform.platform()}, torch {torch.__version__}, 1 thread, {args.rounds} "
            f"interleaved rounds, load average at end {load[0]:.2f}. GEMM 1024^3 fp32 "
            f"{rate:.1f} GFLOP/s; meta-step {meta_flops / 1e9:.1f} GFLOP, forward+backward "
            f"{fb_flops / 1e9:.1f} GFLOP; floor {floor_s * 1e3:.0f} ms.",
            "",
            "| case | median ms | vs plain loop | of floor | / fwd+bwd (same layout) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['case']} | {r['median_ms']:.0f} | {r['vs_plain_loop']:.2f}x | "
            f"{r['floor_fraction']:.0%} | {r['over_fwd_bwd_same_layout']:.2f}x |"
            for r in rows
        ]
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "gemm_gflops": rate,
                    "meta_gflop": meta_flops / 1e9,
                    "fwd_bwd_gflop": fb_flops / 1e9,
                    "floor_ms": floor_s * 1e3,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
