"""Why sinusoid test tasks diverge: curvature of a meta-learned initialization, per task.

For each of N tasks of a split (drawn exactly as ``metagrad eval`` draws them: the run's seed,
25 at a time, the run's test shots and queries), in float64:

* ``alpha * lambda_max``: the inner step size times the largest-magnitude eigenvalue of the
  Hessian of the task's support loss at the initialization (power iteration, 200 HVPs).
  Gradient descent with a fixed step ``alpha`` is unstable along a direction whose curvature
  exceeds ``2 / alpha``, i.e. ``alpha * lambda > 2``;
* the largest stable step: the largest ``alpha * 2**(k/4)`` (k = -8..8) for which 10 steps
  never raise the support loss above its starting value;
* the support and query losses after 0..10 steps at the run's ``inner_lr``.

usage: python results/sinusoid-divergence/curvature.py CHECKPOINT [val|test] [N] [--shots K]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

from metagrad.tasks import derive_seed
from metagrad.training import Trainer
from metagrad.training._build import TEST_STREAM, VAL_STREAM, make_sampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("split", nargs="?", default="test", choices=("val", "test"))
    ap.add_argument("tasks", nargs="?", type=int, default=600)
    ap.add_argument("--shots", type=int, help="support points (default: the run's test shots)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    overrides = {"eval_shots": args.shots} if args.shots else {}
    t = Trainer.from_checkpoint(args.checkpoint, overrides=overrides)
    cfg, alpha = t.cfg, t.cfg.inner_lr
    model = t.model.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = th[i : i + math.prod(s)].view(s)
            i += math.prod(s)
        return ((functional_call(model, parts, (x,)) - y) ** 2).mean()

    g = grad(loss)

    def hvp(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return jvp(lambda t_: g(t_, x, y), (th,), (v,))[1]

    stream = VAL_STREAM if args.split == "val" else TEST_STREAM
    sampler = make_sampler(cfg, t.splits, args.split, seed=derive_seed(cfg.seed, stream))
    amp, phase, batches, done = [], [], [], 0
    while done < args.tasks:  # the draws of metagrad.training.evaluate
        n = min(25, args.tasks - done)
        a, p = sampler.sample_functions(n)
        amp.append(a)
        phase.append(p)
        batches.append(sampler.batch_for(a, p))
        done += n
    A, PH = torch.cat(amp).numpy(), torch.cat(phase).numpy()
    xs, ys, xq, yq = (torch.cat([b[i] for b in batches]).double() for i in range(4))
    T = len(A)
    th0 = theta0.expand(T, -1).clone()
    v = torch.randn(T, theta0.numel(), generator=torch.Generator().manual_seed(0))
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(200):
        hv = vmap(hvp)(th0, xs, ys, v)
        lam = (hv * v).sum(1)
        v = hv / hv.norm(dim=1, keepdim=True)
    gnorm = vmap(g)(th0, xs, ys).norm(dim=1).numpy()
    al_lam = (alpha * lam).numpy()

    def trajectory(lr: float) -> tuple[np.ndarray, np.ndarray]:
        th, sup, qry = th0.clone(), [], []
        for k in range(11):
            if k:
                th = th - lr * vmap(g)(th, xs, ys)
            sup.append(vmap(loss)(th, xs, ys))
            qry.append(vmap(loss)(th, xq, yq))
        return torch.stack(sup, 1).numpy(), torch.stack(qry, 1).numpy()

    sup, qry = trajectory(alpha)
    stable = np.zeros(T)
    for k in range(-8, 9):
        lr = alpha * 2 ** (k / 4)
        s, _ = trajectory(lr)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(s).all(1) & (np.nan_to_num(s, nan=np.inf).max(1) <= s[:, 0])
        stable = np.where(ok, lr, stable)
    with np.errstate(invalid="ignore", over="ignore"):
        rise = {k: int((~(sup[:, k] <= sup[:, 0])).sum()) for k in (1, 5, 10)}
        blown = np.where(~np.isfinite(qry[:, 10]) | (np.nan_to_num(qry[:, 10], nan=np.inf) > 100))[
            0
        ]
    print(f"{args.checkpoint}: {T} {args.split} tasks, {xs.shape[1]}-shot, alpha={alpha}, "
          f"{t.iteration} iterations, inner_steps={cfg.inner_steps}, step_weights={cfg.step_weights}")  # fmt: skip
    q = np.percentile(al_lam, [50, 90, 99, 100])
    print(f"alpha*lambda_max: median {q[0]:.2f}, p90 {q[1]:.2f}, p99 {q[2]:.2f}, max {q[3]:.2f}; "
          f"> 2 (unstable direction) in {(al_lam > 2).sum()}/{T} tasks")  # fmt: skip
    print(f"largest stable step (10 steps never raise the support loss): median "
          f"{np.median(stable):.4f}, min {stable.min():.4f}; below alpha in "
          f"{(stable < alpha).sum()}/{T} tasks")  # fmt: skip
    print(f"support loss above its start after 1/5/10 steps: {rise[1]}/{rise[5]}/{rise[10]} tasks")
    with np.errstate(over="ignore", invalid="ignore"):
        means = [float(np.mean(qry[:, k])) for k in (1, 5, 10)]
    print(f"query MSE mean after 1/5/10 steps: {means[0]:.4g} / {means[1]:.4g} / {means[2]:.4g}; "
          f"median {np.median(qry[:, 1]):.3f} / {np.median(qry[:, 5]):.3f} / "
          f"{np.median(qry[:, 10]):.3f}")  # fmt: skip
    for lo, hi in ((0.1, 2.0), (2.0, 4.0), (4.0, 5.0)):
        m = (A >= lo) & (A < hi)
        print(f"  amplitude [{lo}, {hi}): {m.sum()} tasks, median alpha*lambda "
              f"{np.median(al_lam[m]):.2f}, support loss up after 10 steps in "
              f"{int((~(sup[m, 10] <= sup[m, 0])).sum())}")  # fmt: skip
    print(f"tasks whose 10-step query MSE exceeds 100 or is not finite: {len(blown)}")
    for i in blown:
        print(f"  task {i}: amplitude {A[i]:.2f}, phase {PH[i]:.2f}, alpha*lambda {al_lam[i]:.2f}, "
              f"|grad| {gnorm[i]:.1f} (median {np.median(gnorm):.1f}), stable step {stable[i]:.4f}, "
              f"support x {np.round(xs[i, :, 0].numpy(), 2).tolist()}, support loss "
              f"{' '.join(f'{v:.3g}' for v in sup[i])}")  # fmt: skip


if __name__ == "__main__":
    main()
