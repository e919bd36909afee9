"""Time per exact second-order meta-step of the Omniglot ViT: metagrad vs a plain create_graph loop.

The workload of ``metagrad train omniglot --model vit``: ``metagrad.models.vit()`` (16 patches of
7x7, 3 pre-norm blocks of width 64, 4 heads; 105k parameters), 5-way 1-shot, 15 queries per class
(75 query images), meta-batch 8, 1 inner SGD step at alpha 0.4, float32.

* ``metagrad``: ``MAML(order=2)`` with ``strategy="auto"`` (the per-task loop: LayerNorm) and the
  default kernel policy: math attention kernel for the support forward (its backward is
  differentiated), the fast (flash) kernel for the query forward.
* ``plain``: what a user writes by hand: per task ``functional_call`` + ``torch.autograd.grad(
  create_graph=True)``, the whole meta-step under ``sdpa_kernel(SDPBackend.MATH)`` (PyTorch
  refuses the flash kernel's double backward otherwise).
* ``first_order``: metagrad at ``order=1`` (fast kernels everywhere), for scale.

Both exact variants compute the same meta-gradient (checked here to 1e-5 relative in float32).
Reports the median of ``--repeats`` meta-steps per variant (interleaved round-robin after 2
warm-up rounds); the ratio is metagrad / plain. Set ``OMP_NUM_THREADS`` before running to fix the thread count.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_vit.py [--repeats 10] [--meta-batch 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import metagrad as mg
from metagrad.models import vit


def _tasks(T: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.rand(T, 5, 1, 28, 28, generator=g), torch.rand(T, 75, 1, 28, 28, generator=g)
    ys = torch.arange(5).repeat(T, 1)
    yq = torch.arange(5).repeat_interleave(15).repeat(T, 1)
    return xs, ys, xq, yq


def plain_meta_grad(
    model: torch.nn.Module, tasks: tuple[torch.Tensor, ...], lr: float
) -> list[torch.Tensor]:
    """The hand-written unrolled loop (one task's graph at a time), math kernel throughout."""
    xs, ys, xq, yq = tasks
    params = dict(model.named_parameters())
    names = list(params)
    total = [torch.zeros_like(p) for p in params.values()]
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(xs.shape[0]):
            loss = F.cross_entropy(functional_call(model, params, (xs[i],)), ys[i])
            gs = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            fast = {n: params[n] - lr * g for n, g in zip(names, gs)}
            q = F.cross_entropy(functional_call(model, fast, (xq[i],)), yq[i])
            for t, g in zip(total, torch.autograd.grad(q, list(params.values()))):
                t += g / xs.shape[0]
    return total


def _interleaved_ms(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median ms per call of each function, calls interleaved round-robin (so a busy machine
    slows every variant alike), after 2 warm-up rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 2):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--meta-batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = vit()
    tasks = _tasks(args.meta_batch)
    lr = 0.4
    second = mg.MAML(model, F.cross_entropy, inner_lr=lr, inner_steps=1, order=2)
    first = mg.MAML(model, F.cross_entropy, inner_lr=lr, inner_steps=1, order=1)

    got = second.meta_grad(*tasks)
    ref = plain_meta_grad(model, tasks, lr)
    a = torch.cat([got[f"module.{n}"].reshape(-1) for n, _ in model.named_parameters()])
    b = torch.cat([g.reshape(-1) for g in ref])
    err = float((a - b).norm() / b.norm())

    def step(learner: mg.MAML) -> None:
        model.zero_grad()
        learner.meta_loss(*tasks).backward()

    def plain_step() -> None:
        for p, g in zip(model.parameters(), plain_meta_grad(model, tasks, lr)):
            p.grad = g

    ms = _interleaved_ms(
        {
            "metagrad": lambda: step(second),
            "plain": plain_step,
            "first_order": lambda: step(first),
        },
        args.repeats,
    )
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    print(
        f"ViT {sum(p.numel() for p in model.parameters())} params, meta-batch "
        f"{args.meta_batch}, 5-way 1-shot 15 queries, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {threads} thread(s)"
    )
    print(f"metagrad vs plain meta-gradient: rel. error {err:.1e}")
    for k, v in ms.items():
        print(f"  {k:12s} {v:8.1f} ms per meta-step")
    print(f"  ratio metagrad / plain create_graph loop: {ms['metagrad'] / ms['plain']:.2f}")


if __name__ == "__main__":
    main()
