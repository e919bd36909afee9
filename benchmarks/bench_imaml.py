"""iMAML's meta-gradient: metagrad batched vs its per-task loop vs a hand-written torch.func iMAML.

Sinusoid MLP 1-40-40-1, 25 tasks, K=10/10, proximal inner loop of ``--steps`` SGD steps
(alpha 0.01, lambda 20), ``--cg`` conjugate-gradient steps, float32, ``torch.set_num_threads(1)``.
All three are checked against each other in float64 first (global relative error of the whole
gradient), then timed in interleaved rounds (one call of each per round; median and IQR).

* metagrad batched: ``mg.IMAML`` as shipped (tasks in one vmap, one batched CG).
* metagrad per-task loop: the same learner forced onto its loop (``_vmap_ok = False``), which is
  what every model vmap cannot run (channels-last conv nets on CPU) gets.
* hand-written torch.func: ``vmap`` over tasks of (proximal GD with ``torch.func.grad``, then CG
  on ``torch.func.vjp``-of-``grad`` Hessian products with a fixed iteration count), the pattern
  a user writes from the iMAML paper.

Usage::

    python benchmarks/bench_imaml.py [--rounds 20] [--steps 16] [--cg 5]
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
from torch.func import functional_call, grad, vjp, vmap

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import metagrad as mg
from metagrad.models import sinusoid_mlp
from metagrad.tasks import SinusoidTasks

Params = dict[str, torch.Tensor]


def hand_written(
    net: torch.nn.Module, alpha: float, lam: float, steps: int, cg_steps: int
) -> Callable[..., Params]:
    """A user's torch.func iMAML: vmap over tasks of the proximal solve and a fixed-length CG."""

    def loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(net, p, (x,)), y)

    def one(theta: Params, xs: torch.Tensor, ys: torch.Tensor, xq, yq) -> Params:  # type: ignore[no-untyped-def]
        t = dict(theta)
        for _ in range(steps):
            g = grad(loss)(t, xs, ys)
            t = {k: t[k] - alpha * (g[k] + lam * (t[k] - theta[k])) for k in t}
        b = grad(loss)(t, xq, yq)

        _, pull = vjp(lambda p: grad(loss)(p, xs, ys), t)

        def A(v: Params) -> Params:  # (H + lam I) v, reverse over reverse (H symmetric)
            hv = pull(v)[0]
            return {k: hv[k] + lam * v[k] for k in v}

        def dot(a: Params, c: Params) -> torch.Tensor:
            return sum((a[k] * c[k]).sum() for k in a)  # type: ignore[return-value]

        x = {k: torch.zeros_like(v) for k, v in b.items()}
        r, p = dict(b), dict(b)
        rs = dot(r, r)
        for _ in range(cg_steps):
            ap = A(p)
            a = rs / dot(p, ap)
            x = {k: x[k] + a * p[k] for k in x}
            r = {k: r[k] - a * ap[k] for k in r}
            rs_new = dot(r, r)
            p = {k: r[k] + (rs_new / rs) * p[k] for k in p}
            rs = rs_new
        return {k: lam * v for k, v in x.items()}

    def meta_grad(theta: Params, xs, ys, xq, yq) -> Params:  # type: ignore[no-untyped-def]
        th = {k: v.detach() for k, v in theta.items()}
        with torch.no_grad():
            g = vmap(one, in_dims=(None, 0, 0, 0, 0))(th, xs, ys, xq, yq)
        return {k: v.mean(0) for k, v in g.items()}

    return meta_grad


def _rel(a: Params, b: Params) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    return (num / sum(float(v.pow(2).sum()) for v in b.values())) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--cg", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    alpha, lam = 0.01, 20.0
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        "?",
    )  # fmt: skip
    print(
        f"Machine: {platform.machine()} {cpu}; 1 thread; python {platform.python_version()}, "
        f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}. Sinusoid MLP, 25 "
        f"tasks, K=10/10, {args.steps} proximal SGD steps (alpha {alpha}, lambda {lam}), "
        f"{args.cg} CG steps."
    )
    b = SinusoidTasks(10, 10, seed=0).sample(25)
    for dtype in (torch.float64, torch.float32):
        _run(dtype, b, alpha, lam, args)


def _implementations(
    dtype: torch.dtype, b: object, alpha: float, lam: float, args: argparse.Namespace
) -> dict[str, Callable[[], Params]]:
    """The three implementations on the same model copy and tasks, in ``dtype``."""
    torch.manual_seed(0)
    net = sinusoid_mlp().to(dtype)
    tasks = [t.to(dtype) for t in (b.xs, b.ys, b.xq, b.yq)]  # type: ignore[attr-defined]
    kw = dict(inner_lr=alpha, inner_steps=args.steps, lam=lam, cg_steps=args.cg)
    batched = mg.IMAML(net, F.mse_loss, **kw)  # type: ignore[arg-type]
    loop = mg.IMAML(net, F.mse_loss, **kw)  # type: ignore[arg-type]
    loop._vmap_ok = False  # the per-task loop
    hand = hand_written(net, alpha, lam, args.steps, args.cg)
    theta = dict(net.named_parameters())

    def strip(g: dict[str, torch.Tensor | None]) -> Params:
        return {k.removeprefix("module."): v for k, v in g.items() if v is not None}

    return {
        "metagrad IMAML (batched, default)": lambda: strip(batched.meta_grad(*tasks)),
        "metagrad IMAML (per-task loop)": lambda: strip(loop.meta_grad(*tasks)),
        "hand-written torch.func iMAML": lambda: hand(theta, *tasks),
    }


def _run(dtype: torch.dtype, b: object, alpha: float, lam: float, args: argparse.Namespace) -> None:
    impls = _implementations(dtype, b, alpha, lam, args)
    if dtype == torch.float64:
        ref = impls["metagrad IMAML (per-task loop)"]()
        for name, f in impls.items():
            print(f"  float64 gradient check, {name}: relative error {_rel(f(), ref):.1e}")
        return
    times: dict[str, list[float]] = {k: [] for k in impls}
    for f in impls.values():
        f()
    for _ in range(args.rounds):
        for name, f in impls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["hand-written torch.func iMAML"])
    print("\n| implementation | median ms | IQR ms | x hand-written |\n| --- | --- | --- | --- |")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {(q[2] - q[0]) * 1e3:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
