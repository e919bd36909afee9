"""Memory and time of exact second-order MAML on LoRA adapters vs on the whole model.

One transformer, three ways to meta-learn it (all ``order=2``, the per-task loop, float32):

* ``full``: MAML on every parameter (the baseline);
* ``lora``: ``add_lora(model, ["attn.q", "attn.v"], rank=4)``, base frozen: only the adapters
  are adapted and meta-learned;
* ``lora_adapt``: the same adapters with the base trainable and ``adapt=lora_only``: the inner
  loop adapts the adapters, the outer loop meta-learns everything (ANIL's mechanism).

Model: ``metagrad.models.vit(dim=128, depth=4, heads=4)`` (``--dim``, ``--depth``) on Omniglot-shaped tasks (28x28, 16
patches; 545k parameters), 5-way 1-shot, 15 queries per class, meta-batch 4. Each cell runs in a
FRESH subprocess (1 thread): the growth of the peak resident set over one meta-step (MB), then
the median time of ``--repeats`` further meta-steps.

Usage::

    python benchmarks/bench_adapters.py [--steps 1,5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

from _cell import run_cell

VARIANTS = ("full", "lora", "lora_adapt")


def _cell(
    variant: str, steps: int, repeats: int, dim: int = 128, depth: int = 4
) -> dict[str, float]:
    """Runs in the child process."""
    import torch
    import torch.fx.experimental.symbolic_shapes  # one-time import (~40 MB), not activations
    import torch.nn.functional as F

    import metagrad as mg
    from metagrad.models import add_lora, lora_only, vit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = vit(dim=dim, depth=depth, heads=4)
    adapt = None
    if variant != "full":
        add_lora(model, ["attn.q", "attn.v"], rank=4, freeze_base=variant == "lora")
        adapt = lora_only if variant == "lora_adapt" else None
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=steps, adapt=adapt)
    T = 4
    xs, xq = torch.rand(T, 5, 1, 28, 28), torch.rand(T, 75, 1, 28, 28)
    ys = torch.arange(5).repeat(T, 1)
    yq = torch.arange(5).repeat_interleave(15).repeat(T, 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    learner.meta_loss(xs, ys, xq, yq).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        model.zero_grad()
        t0 = time.perf_counter()
        learner.meta_loss(xs, ys, xq, yq).backward()
        times.append(time.perf_counter() - t0)
    return {
        "peak_mb": (after - before) / 1024.0,
        "ms": 1000 * statistics.median(times),
        "adapted": sum(p.numel() for n, p in model.named_parameters() if n in learner.adapt_names),
        "meta_learned": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def _run_cell(variant: str, steps: int, repeats: int, dim: int, depth: int) -> dict[str, float]:
    res, err = run_cell("bench_adapters", variant, steps, repeats, dim, depth)
    if err is not None:
        raise RuntimeError(err)
    return res  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="1,5", help="inner step counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=128, help="transformer width")
    ap.add_argument("--depth", type=int, default=4, help="encoder blocks")
    args = ap.parse_args()
    import torch

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        platform.machine(),
    )
    print(
        f"{cpu}, {os.cpu_count()} cores, 1 thread; torch {torch.__version__}; "
        f"vit(dim={args.dim}, depth={args.depth}, heads=4)",
        flush=True,
    )
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        cells = {v: _run_cell(v, steps, args.repeats, args.dim, args.depth) for v in VARIANTS}
        for v, r in cells.items():
            rows.append((steps, v, r))
            print(
                f"K={steps} {v:10s} adapted {r['adapted']:7d} meta-learned {r['meta_learned']:7d} "
                f"of {r['total']}: peak +{r['peak_mb']:7.1f} MB, {r['ms']:7.1f} ms per meta-step",
                flush=True,
            )
        full = cells["full"]
        for v in VARIANTS[1:]:
            r = cells[v]
            print(
                f"K={steps} {v:10s} / full: memory {r['peak_mb'] / full['peak_mb']:.2f}x, "
                f"time {r['ms'] / full['ms']:.2f}x",
                flush=True,
            )
    print(
        "\n| K | variant | adapted | meta-learned | peak MB | ms / meta-step | vs full (mem, time) |"
    )
    print("|---|---|---|---|---|---|---|")
    by_k = {(k, v): r for k, v, r in rows}
    for k, v, r in rows:
        f = by_k[(k, "full")]
        print(
            f"| {k} | {v} | {r['adapted']:,} | {r['meta_learned']:,} | {r['peak_mb']:.0f} | "
            f"{r['ms']:.0f} | {r['peak_mb'] / f['peak_mb']:.2f}x, {r['ms'] / f['ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
