"""Bilevel hypergradients: every metagrad strategy against higher, TorchOpt and torch.func.

Workloads (float32 timing, float64 gate, one thread):

* ``hpo``: the hyperparameter-optimization workload (``metagrad.workloads.hpo_problem``):
  dG/d(per-layer log lr, log wd) of the validation loss after 100 full-batch steps of SGD with
  momentum 0.9 on 500 images, MLP 64-64-64-10.
* ``reweight``: one learning-to-reweight lookahead (``metagrad.workloads.lookahead_problem``):
  dG/d(eps) of the clean loss (100 images) after one SGD step on the eps-weighted batch of 100,
  MLP 64-128-128-10.
* ``unroll-K{10,50,200}``: dG/d(lr, wd) after K steps of SGD with momentum 0.9 on 256 images,
  MLP 64-64-10; ``unroll-adam-K50``: the same with Adam.
* ``implicit``: dG/d(log lambda) of a ridge-regularized softmax regression (64 -> 10) solved by
  1000 gradient steps: implicit differentiation against unrolled reverse and forward mode.

Rows: metagrad strategies (``auto`` is the engine's default), ``higher.innerloop_ctx``,
TorchOpt's ``MetaSGD``/``MetaAdam`` (one per layer where learning rates are per layer) and
``torchopt.diff.implicit.custom_root``, and a hand-written ``torch.func`` loop (the gate's
reference; the implicit workload's reference is a dense Hessian solve).

Method: (1) gate: every row once in float64 on the same data and initialization, relative
error of the concatenated hypergradient against the reference (exact rows: <= 1e-8; implicit
workload: <= 1e-6, the tolerance of its linear solves); (2) timing: float32, every row warmed
up, then interleaved rounds (the order rotates), each timing one single call and one burst of
``--burst`` calls (time per call), medians reported; (3) memory: a fresh forked process per
(workload, row): warm-up call, ``malloc_trim``, reset of the RSS high-water mark through
``/proc/self/clear_refs``, one call; peak = ``VmHWM`` - ``VmRSS`` before the call.

Usage::

    python benchmarks/bench_bilevel.py --markdown /tmp/bilevel.md --json /tmp/bilevel.json
    python benchmarks/bench_bilevel.py --only unroll-K10 --rounds 3 --no-memory
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import _peers  # noqa: E402
from metagrad import bilevel, optim  # noqa: E402
from metagrad.workloads import (  # noqa: E402
    MLP,
    HPOConfig,
    forward,
    hpo_problem,
    init_mlp,
    lookahead_problem,
)

higher, torchopt = _peers.higher, _peers.torchopt  # imported (or not) once, by _peers
# Why a peer is unavailable, without _peers' "unavailable: " prefix (machine() adds its own).
HIGHER_ERR, TORCHOPT_ERR = (
    None if err is None else err.removeprefix("unavailable: ")[:160]
    for err in (_peers.HIGHER_ERR, _peers.TORCHOPT_ERR)
)

Fn = Callable[[], list[Tensor]]
"""One hypergradient computation: returns the gradients in the workload's canonical order."""


version = _peers.package_version


# ------------------------------------------------------------------------------------------
# data and shared pieces
# ------------------------------------------------------------------------------------------
def digits(n: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` digits images (scikit-learn's, if installed; else random images: speed only)."""
    try:
        from metagrad.workloads._data import _sklearn_digits

        x, y = _sklearn_digits()
    except ImportError:
        g0 = torch.Generator().manual_seed(99)
        x, y = torch.rand(1797, 64, generator=g0, dtype=torch.float64), torch.arange(1797) % 10
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n]
    return x[idx].to(dtype), y[idx]


def module_from(w: dict[str, Tensor], sizes: tuple[int, ...]) -> MLP:
    """A fresh :class:`MLP` holding copies of ``w`` (peers need an ``nn.Module``)."""
    m = MLP(sizes, dtype=next(iter(w.values())).dtype)
    m.load_state_dict({k: v.detach() for k, v in w.items()})
    return m


def decay(params: dict[str, Tensor], wd: Tensor | list[Tensor]) -> Tensor:
    """``0.5 * sum_l wd_l * ||W_l||^2`` (``wd`` one tensor for all layers or one per layer)."""
    total = torch.zeros((), dtype=next(iter(params.values())).dtype)
    for k, v in params.items():
        if k.endswith(".weight"):
            c = wd[int(k[1 : k.index(".")])] if isinstance(wd, list) else wd
            total = total + c * (v**2).sum()
    return 0.5 * total


def fparams(fm: Any, n: int) -> dict[str, Tensor]:
    """The fast weights of a higher/TorchOpt module by our parameter names."""
    out = {}
    for i in range(n):
        layer = getattr(fm, f"l{i}")
        out[f"l{i}.weight"], out[f"l{i}.bias"] = layer.weight, layer.bias
    return out


def sgd_momentum_step(
    w: dict[str, Tensor], g: dict[str, Tensor], buf: dict[str, Tensor] | None, lr: Any, m: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """torch.optim.SGD(momentum=m) by hand: buf = g at the first step, then m * buf + g."""
    new_buf = {k: g[k] if buf is None else m * buf[k] + g[k] for k in w}
    lrs = lr if isinstance(lr, dict) else {k: lr for k in w}
    return {k: w[k] - lrs[k] * new_buf[k] for k in w}, new_buf


@dataclass
class Workload:
    name: str
    describe: str
    rows: dict[str, Fn]
    reference: str
    tol: float = 1e-8
    notes: dict[str, str] = field(default_factory=dict)
    # Rows gated under torch.set_default_dtype(float64), with the reason.
    default_f64: dict[str, str] = field(default_factory=dict)
    # Measured for memory only (not a hypergradient: neither gated nor timed).
    memory_rows: dict[str, Fn] = field(default_factory=dict)


STRATEGIES = ("auto", "unroll", "vmap", "adjoint", "checkpoint", "forward")
"""The metagrad strategies every unrolled workload times (its first rows, in this order)."""


def strategy_fn(
    pb: bilevel.Problem,
    w0: dict[str, Tensor],
    h: dict[str, Tensor],
    tr: tuple[Tensor, Tensor],
    va: tuple[Tensor, Tensor],
    pick: Callable[[Any], list[Tensor]],
    strategy: str,
    **kw: Any,
) -> Fn:
    """One metagrad row: ``bilevel.hypergrad`` by ``strategy``, ``pick`` chooses the grads.

    ``vmap`` runs the problem as a batch of one (``kw`` are not passed to it).
    """

    def fn() -> list[Tensor]:
        if strategy == "vmap":
            b = lambda t: tuple(v.unsqueeze(0) for v in t)  # noqa: E731
            res = bilevel.hypergrad(pb, w0, h, b(tr), b(va), strategy="vmap", batched=True)
        else:
            res = bilevel.hypergrad(pb, w0, h, tr, va, strategy=strategy, **kw)
        return pick(res.grads)

    return fn


def strategy_rows(
    mg: Callable[[str], Fn], strategies: tuple[str, ...] = STRATEGIES
) -> dict[str, Fn]:
    """``{"metagrad <strategy>": mg(strategy)}`` for each of ``strategies``, in order."""
    return {f"metagrad {s}": mg(s) for s in strategies}


def with_peers(
    rows: dict[str, Fn], higher_rows: dict[str, Fn], torchopt_rows: dict[str, Fn]
) -> dict[str, Fn]:
    """``rows`` followed by the higher and TorchOpt rows of the peers that are installed."""
    if higher is not None:
        rows.update(higher_rows)
    if torchopt is not None:
        rows.update(torchopt_rows)
    return rows


# ------------------------------------------------------------------------------------------
# workload 1: hyperparameter optimization (per-layer lr and wd, SGD momentum, K = 100)
# ------------------------------------------------------------------------------------------
def hpo_workload(dtype: torch.dtype, steps: int = 100) -> Workload:
    sizes = (64, 64, 64, 10)
    x, y = digits(800, dtype, 0)
    tr, va = (x[:500], y[:500]), (x[500:], y[500:])
    w0 = init_mlp(sizes, seed=0, dtype=dtype)
    L = 3
    log_lr = torch.full((L,), math.log(0.1), dtype=dtype, requires_grad=True)
    log_wd = torch.full((L,), math.log(1e-3), dtype=dtype, requires_grad=True)
    cfg = HPOConfig(hidden=sizes[1:-1], inner_steps=steps, momentum=0.9)
    pb = hpo_problem(cfg)
    h = {"log_lr": log_lr, "log_wd": log_wd}

    def mg(strategy: str, **kw: Any) -> Fn:
        pick = lambda gr: [gr.h["log_lr"], gr.h["log_wd"]]  # noqa: E731
        return strategy_fn(pb, w0, h, tr, va, pick, strategy, **kw)

    def func_loop() -> list[Tensor]:
        def G(a: Tensor, b: Tensor) -> Tensor:
            lr = {k: torch.exp(a[int(k[1])]) for k in w0}
            wd = [torch.exp(b[i]) for i in range(L)]
            f = lambda w: F.cross_entropy(forward(w, tr[0]), tr[1]) + decay(w, wd)  # noqa: E731
            w, buf = dict(w0), None
            for _ in range(steps):
                w, buf = sgd_momentum_step(w, torch.func.grad(f)(w), buf, lr, 0.9)
            return F.cross_entropy(forward(w, va[0]), va[1])

        return list(torch.func.grad(G, argnums=(0, 1))(log_lr.detach(), log_wd.detach()))

    def higher_loop() -> list[Tensor]:
        m = module_from(w0, sizes)
        groups = [
            {"params": [getattr(m, f"l{i}").weight, getattr(m, f"l{i}").bias]} for i in range(L)
        ]
        opt = torch.optim.SGD(groups, lr=1.0, momentum=0.9)
        wd = [torch.exp(log_wd[i]) for i in range(L)]
        lrs = [torch.exp(log_lr[i]) for i in range(L)]
        with higher.innerloop_ctx(m, opt, copy_initial_weights=True) as (fm, diffopt):
            for _ in range(steps):
                loss = F.cross_entropy(fm(tr[0]), tr[1]) + decay(fparams(fm, L), wd)
                diffopt.step(loss, override={"lr": lrs})
            out = F.cross_entropy(fm(va[0]), va[1])
        return list(torch.autograd.grad(out, [log_lr, log_wd]))

    def torchopt_loop() -> list[Tensor]:
        m = module_from(w0, sizes)
        opts = [
            torchopt.MetaSGD(getattr(m, f"l{i}"), lr=torch.exp(log_lr[i]), momentum=0.9)
            for i in range(L)
        ]
        wd = [torch.exp(log_wd[i]) for i in range(L)]
        for _ in range(steps):
            loss = F.cross_entropy(m(tr[0]), tr[1]) + decay(fparams(m, L), wd)
            for o in opts:  # one MetaSGD per layer: per-layer learning rates
                o.step(loss)
        out = F.cross_entropy(m(va[0]), va[1])
        return list(torch.autograd.grad(out, [log_lr, log_wd]))

    rows = with_peers(
        {
            **strategy_rows(mg),
            "metagrad implicit": mg(
                "implicit", implicit_options=bilevel.ImplicitOptions(residual_tol=1e9)
            ),
            "metagrad truncated (k=10)": mg("truncated", truncate=10),
            "torch.func loop": func_loop,
        },
        {"higher innerloop_ctx": higher_loop},
        {"torchopt MetaSGD (one per layer)": torchopt_loop},
    )
    return Workload(
        "hpo",
        f"HPO: d val-CE / d (3 log lr, 3 log wd), {steps} SGD-momentum steps, 500 images, MLP 64-64-64-10",
        rows,
        "torch.func loop",
        notes={
            "metagrad implicit": "inner loop not solved: an approximation",
            "metagrad truncated (k=10)": "biased by design",
        },
    )


# ------------------------------------------------------------------------------------------
# workload 2: one learning-to-reweight lookahead
# ------------------------------------------------------------------------------------------
def reweight_workload(dtype: torch.dtype) -> Workload:
    sizes = (64, 128, 128, 10)
    x, y = digits(200, dtype, 1)
    batch, clean = (x[:100], y[:100]), (x[100:], y[100:])
    w0 = init_mlp(sizes, seed=0, dtype=dtype)
    lr = 0.03
    eps = torch.zeros(100, dtype=dtype, requires_grad=True)
    pb = lookahead_problem(lr)

    def mg(strategy: str) -> Fn:
        pick = lambda gr: [gr.h["eps"]]  # noqa: E731
        return strategy_fn(pb, w0, {"eps": eps}, batch, clean, pick, strategy)

    def inner(w: dict[str, Tensor], e: Tensor) -> Tensor:
        return (e * F.cross_entropy(forward(w, batch[0]), batch[1], reduction="none")).sum()

    def func_loop() -> list[Tensor]:
        def G(e: Tensor) -> Tensor:
            g = torch.func.grad(inner)(w0, e)
            w = {k: w0[k] - lr * g[k] for k in w0}
            return F.cross_entropy(forward(w, clean[0]), clean[1])

        return [torch.func.grad(G)(eps.detach())]

    def higher_loop() -> list[Tensor]:
        m = module_from(w0, sizes)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        with higher.innerloop_ctx(m, opt) as (fm, diffopt):
            loss = (eps * F.cross_entropy(fm(batch[0]), batch[1], reduction="none")).sum()
            diffopt.step(loss)
            out = F.cross_entropy(fm(clean[0]), clean[1])
        return list(torch.autograd.grad(out, [eps]))

    def torchopt_loop() -> list[Tensor]:
        m = module_from(w0, sizes)
        opt = torchopt.MetaSGD(m, lr=lr)
        loss = (eps * F.cross_entropy(m(batch[0]), batch[1], reduction="none")).sum()
        opt.step(loss)
        out = F.cross_entropy(m(clean[0]), clean[1])
        return list(torch.autograd.grad(out, [eps]))

    rows = with_peers(
        {**strategy_rows(mg), "torch.func loop": func_loop},
        {"higher innerloop_ctx": higher_loop},
        {"torchopt MetaSGD": torchopt_loop},
    )
    return Workload(
        "reweight",
        "reweight: d clean-CE / d eps (100 example weights), 1 SGD step, MLP 64-128-128-10",
        rows,
        "torch.func loop",
    )


# ------------------------------------------------------------------------------------------
# workload 3: unrolled K steps of a small MLP, hypergradient in (lr, wd)
# ------------------------------------------------------------------------------------------
def unroll_workload(
    dtype: torch.dtype, steps: int, adam: bool = False, hidden: int = 64
) -> Workload:
    sizes = (64, hidden, 10)
    x, y = digits(512, dtype, 2)
    tr, va = (x[:256], y[:256]), (x[256:], y[256:])
    w0 = init_mlp(sizes, seed=0, dtype=dtype)
    lr = torch.tensor(1e-3 if adam else 0.1, dtype=dtype, requires_grad=True)
    wd = torch.tensor(1e-3, dtype=dtype, requires_grad=True)
    # Dead ReLU units have exactly zero gradients, where sqrt(v) has no derivative: eps_root
    # (inside the root; metagrad and TorchOpt have it) makes the Adam update smooth there.
    betas, eps_adam, eps_root = (0.9, 0.999), 1e-8, 1e-12

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(forward(w, b[0]), b[1]) + decay(w, h["wd"])

    def g(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(forward(w, b[0]), b[1])

    opt = (
        optim.Adam(lr=lr, betas=betas, eps=eps_adam, eps_root=eps_root)
        if adam
        else optim.SGD(lr=lr, momentum=0.9)
    )
    pb = bilevel.Problem(f, g, opt, steps)

    def mg(strategy: str) -> Fn:
        pick = lambda gr: [gr.opt["lr"], gr.h["wd"]]  # noqa: E731
        return strategy_fn(pb, w0, {"wd": wd}, tr, va, pick, strategy)

    def func_loop() -> list[Tensor]:
        def G(a: Tensor, c: Tensor) -> Tensor:
            inner = lambda w: f(w, {"wd": c}, tr)  # noqa: E731
            w = dict(w0)
            if adam:
                m1 = {k: torch.zeros_like(v) for k, v in w.items()}
                m2 = {k: torch.zeros_like(v) for k, v in w.items()}
                for t in range(1, steps + 1):
                    gr = torch.func.grad(inner)(w)
                    m1 = {k: betas[0] * m1[k] + (1 - betas[0]) * gr[k] for k in w}
                    m2 = {k: betas[1] * m2[k] + (1 - betas[1]) * gr[k] ** 2 for k in w}
                    b1, b2 = 1 - betas[0] ** t, 1 - betas[1] ** t
                    w = {
                        k: w[k] - a / b1 * m1[k] / ((m2[k] / b2 + eps_root).sqrt() + eps_adam)
                        for k in w
                    }
            else:
                buf = None
                for _ in range(steps):
                    w, buf = sgd_momentum_step(w, torch.func.grad(inner)(w), buf, a, 0.9)
            return g(w, {}, va)

        return list(torch.func.grad(G, argnums=(0, 1))(lr.detach(), wd.detach()))

    def higher_loop() -> list[Tensor]:
        m = module_from(w0, sizes)
        inner_opt = (
            torch.optim.Adam(m.parameters(), lr=1.0, betas=betas, eps=eps_adam)
            if adam
            else torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9)
        )
        with higher.innerloop_ctx(m, inner_opt, copy_initial_weights=True) as (fm, diffopt):
            for _ in range(steps):
                loss = F.cross_entropy(fm(tr[0]), tr[1]) + decay(fparams(fm, 2), wd)
                diffopt.step(loss, override={"lr": [lr]})
            out = F.cross_entropy(fm(va[0]), va[1])
        return list(torch.autograd.grad(out, [lr, wd]))

    def torchopt_loop() -> list[Tensor]:
        m = module_from(w0, sizes)
        o = (
            torchopt.MetaAdam(m, lr=lr, betas=betas, eps=eps_adam, eps_root=eps_root)
            if adam
            else torchopt.MetaSGD(m, lr=lr, momentum=0.9)
        )
        for _ in range(steps):
            o.step(F.cross_entropy(m(tr[0]), tr[1]) + decay(fparams(m, 2), wd))
        out = F.cross_entropy(m(va[0]), va[1])
        return list(torch.autograd.grad(out, [lr, wd]))

    def one_step() -> list[Tensor]:
        # What any method holds at least once: one inner step's forward and backward.
        w = {k: v.detach().requires_grad_() for k, v in w0.items()}
        return list(torch.autograd.grad(f(w, {"wd": wd.detach()}, tr), list(w.values())))

    def one_step_second_order() -> list[Tensor]:
        # ... and one differentiable step: its gradient kept with create_graph, then a VJP of
        # it (the working set of every exact reverse or forward step).
        w = {k: v.detach().requires_grad_() for k, v in w0.items()}
        gs = torch.autograd.grad(f(w, {"wd": wd.detach()}, tr), list(w.values()), create_graph=True)
        return list(
            torch.autograd.grad(gs, list(w.values()), grad_outputs=[g.detach() for g in gs])
        )

    rows = with_peers(
        {**strategy_rows(mg), "torch.func loop": func_loop},
        {"higher innerloop_ctx": higher_loop},
        {"torchopt MetaAdam" if adam else "torchopt MetaSGD": torchopt_loop},
    )
    kind = "Adam" if adam else "SGD-momentum"
    name = f"unroll-adam-K{steps}" if adam else f"unroll-K{steps}"
    if hidden != 64:
        name += f"-h{hidden}"
    notes, f64 = {}, {}
    if adam:
        notes["higher innerloop_ctx"] = (
            "higher's Adam: eps outside the bias correction, no eps_root, v = 0 masked: other iterates"
        )
        f64["torchopt MetaAdam"] = (
            "TorchOpt computes Adam's bias correction 1 - b**count in the default dtype (float32)"
        )
    return Workload(
        name,
        f"unrolled: d val-CE / d (lr, wd), K={steps} {kind} steps, 256 images, MLP 64-{hidden}-10",
        rows,
        "torch.func loop",
        notes=notes,
        default_f64=f64,
        memory_rows={
            "one inner step, first order (no hypergradient)": one_step,
            "one inner step, second order (no hypergradient)": one_step_second_order,
        },
    )


# ------------------------------------------------------------------------------------------
# workload 4: implicit differentiation of a solved inner problem
# ------------------------------------------------------------------------------------------
def implicit_workload(dtype: torch.dtype, steps: int = 1000) -> Workload:
    sizes = (64, 10)
    x, y = digits(800, dtype, 3)
    tr, va = (x[:500], y[:500]), (x[500:], y[500:])
    w0 = {k: torch.zeros_like(v) for k, v in init_mlp(sizes, seed=0, dtype=dtype).items()}
    log_lam = torch.tensor(math.log(0.1), dtype=dtype, requires_grad=True)
    lr = 0.5

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        # weights and bias both decayed: strongly convex. Written as 0.5 * (exp(l) * reg): in
        # float32 torch 2.13's jvp-over-grad gives some products of a python scalar and a 0-d
        # tensor a float64 tangent ("expected m1 and m2 to have the same dtype"), e.g.
        # 0.5 * exp(l) * reg or exp(l) * (0.5 * sum(...)); this form runs.
        reg = (w["l0.weight"] ** 2).sum() + (w["l0.bias"] ** 2).sum()
        return F.cross_entropy(forward(w, b[0]), b[1]) + 0.5 * (torch.exp(h["log_lam"]) * reg)

    def g(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(forward(w, b[0]), b[1])

    pb = bilevel.Problem(f, g, optim.SGD(lr=lr), steps)
    h = {"log_lam": log_lam}

    def solve(lam_log: Tensor) -> dict[str, Tensor]:
        """Plain gradient descent without any graph: the solver the implicit rows wrap."""
        w = {k: v.clone() for k, v in w0.items()}
        hd = {"log_lam": lam_log.detach()}
        for _ in range(steps):
            with torch.enable_grad():
                a = {k: v.detach().requires_grad_() for k, v in w.items()}
                gs = torch.autograd.grad(f(a, hd, tr), list(a.values()))
            w = {k: v.detach() - lr * gk for (k, v), gk in zip(a.items(), gs)}
        return w

    def mg(strategy: str) -> Fn:
        return strategy_fn(pb, w0, h, tr, va, lambda gr: [gr.h["log_lam"]], strategy)

    names = list(w0)

    def optimality(w: dict[str, Tensor], hd: dict[str, Tensor]) -> dict[str, Tensor]:
        with torch.enable_grad():
            gs = torch.autograd.grad(f(w, hd, tr), [w[k] for k in names], create_graph=True)
        return dict(zip(names, gs))

    mg_root = bilevel.custom_root(optimality, solve="cg", maxiter=100, tol=1e-10)(
        lambda w_init, hd: solve(hd["log_lam"])
    )

    def mg_custom_root() -> list[Tensor]:
        w_star = mg_root({k: v.clone() for k, v in w0.items()}, {"log_lam": log_lam})
        return list(torch.autograd.grad(g(w_star, {}, va), [log_lam]))

    def dense_ift() -> list[Tensor]:
        """Reference: dw*/dlam from the dense Hessian of f at the solution."""
        w_star = solve(log_lam)
        flat = torch.cat([w_star[k].reshape(-1) for k in names])
        shapes = [w_star[k].shape for k in names]

        def unflat(v: Tensor) -> dict[str, Tensor]:
            out, i = {}, 0
            for k, s in zip(names, shapes):
                n = math.prod(s)
                out[k] = v[i : i + n].reshape(s)
                i += n
            return out

        fw = lambda v, a: f(unflat(v), {"log_lam": a}, tr)  # noqa: E731
        H = torch.func.hessian(fw, argnums=0)(flat, log_lam.detach())
        cross = torch.func.jacrev(torch.func.grad(fw, argnums=0), argnums=1)(flat, log_lam.detach())
        gv = torch.func.grad(lambda v: g(unflat(v), {}, va))(flat)
        return [-(gv @ torch.linalg.solve(H, cross.reshape(-1)))]

    def torchopt_root() -> list[Tensor]:
        solve_cg = torchopt.linear_solve.solve_cg(maxiter=100, atol=1e-10)

        def opt_fn(w: Any, lam_log: Tensor) -> Any:
            # torchopt differentiates this with torch.func: the inner gradient is a func.grad.
            gs = torch.func.grad(lambda ws: f(dict(zip(names, ws)), {"log_lam": lam_log}, tr))(
                tuple(w)
            )
            return tuple(gs)

        @torchopt.diff.implicit.custom_root(opt_fn, argnums=1, solve=solve_cg)
        def solver(w_init: Any, lam_log: Tensor) -> Any:
            w = solve(lam_log)
            return tuple(w[k] for k in names)

        w_star = solver(tuple(w0[k].clone() for k in names), log_lam)
        return list(torch.autograd.grad(g(dict(zip(names, w_star)), {}, va), [log_lam]))

    def higher_loop() -> list[Tensor]:
        m = module_from(w0, sizes)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        with higher.innerloop_ctx(m, opt, copy_initial_weights=True) as (fm, diffopt):
            for _ in range(steps):
                diffopt.step(f(fparams(fm, 1), h, tr))
            out = F.cross_entropy(fm(va[0]), va[1])
        return list(torch.autograd.grad(out, [log_lam]))

    def torchopt_unrolled() -> list[Tensor]:
        m = module_from(w0, sizes)
        o = torchopt.MetaSGD(m, lr=lr)
        for _ in range(steps):
            o.step(f(fparams(m, 1), h, tr))
        out = F.cross_entropy(m(va[0]), va[1])
        return list(torch.autograd.grad(out, [log_lam]))

    rows = with_peers(
        {
            **strategy_rows(mg, ("auto", "unroll", "adjoint", "checkpoint", "forward", "implicit")),
            "metagrad custom_root": mg_custom_root,
            "dense IFT (torch.func.hessian + solve)": dense_ift,
        },
        {"higher innerloop_ctx (unrolled)": higher_loop},
        {
            "torchopt custom_root (CG)": torchopt_root,
            "torchopt MetaSGD (unrolled)": torchopt_unrolled,
        },
    )
    return Workload(
        "implicit",
        f"implicit: d val-CE / d log lambda, ridge softmax regression 64->10 solved by {steps} GD steps",
        rows,
        "dense IFT (torch.func.hessian + solve)",
        tol=1e-6,
    )


BUILDERS: dict[str, Callable[[torch.dtype], Workload]] = {
    "hpo": hpo_workload,
    "reweight": reweight_workload,
    "unroll-K10": lambda d: unroll_workload(d, 10),
    "unroll-K50": lambda d: unroll_workload(d, 50),
    "unroll-K200": lambda d: unroll_workload(d, 200),
    "unroll-adam-K50": lambda d: unroll_workload(d, 50, adam=True),
    "implicit": implicit_workload,
}
# Memory only: forward mode (and the reverse strategies) against the model size.
MEMORY_ONLY: dict[str, Callable[[torch.dtype], Workload]] = {
    "unroll-K50-h16": lambda d: unroll_workload(d, 50, hidden=16),
    "unroll-K50-h256": lambda d: unroll_workload(d, 50, hidden=256),
    "unroll-K50-h1024": lambda d: unroll_workload(d, 50, hidden=1024),
}
GRID = ("unroll-K10", "unroll-K50", "unroll-K200", *MEMORY_ONLY)


def memory_cells(builder: Callable[[torch.dtype], Workload]) -> dict[str, Any]:
    """Peak memory of every row of a workload, memory-only rows included (one process each)."""
    wl = builder(torch.float32)
    return {row: memory(builder, row) for row in [*wl.rows, *wl.memory_rows]}


# ------------------------------------------------------------------------------------------
# gate, timing, memory
# ------------------------------------------------------------------------------------------
def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    va = torch.cat([t.reshape(-1).to(torch.float64) for t in a])
    vb = torch.cat([t.reshape(-1).to(torch.float64) for t in b])
    return float((va - vb).norm() / vb.norm().clamp_min(1e-300))


def gate(name: str) -> dict[str, dict[str, Any]]:
    wl = BUILDERS[name](torch.float64)
    out: dict[str, dict[str, Any]] = {}
    ref = wl.rows[wl.reference]()
    for row, fn in wl.rows.items():
        if row == wl.reference:
            out[row] = {"status": "reference", "rel_err": 0.0}
            continue
        before = torch.get_default_dtype()
        try:
            if row in wl.default_f64:
                torch.set_default_dtype(torch.float64)
            with _quiet():
                err = rel_err(fn(), ref)
        except Exception as e:  # a failing row is a result, not a crash
            out[row] = {"status": f"FAILED: {type(e).__name__}: {str(e)[:120]}", "rel_err": None}
            continue
        finally:
            torch.set_default_dtype(before)
        ok = err <= wl.tol
        status = "yes" if ok else f"no ({wl.notes[row]})" if row in wl.notes else "WRONG"
        if ok and row in wl.default_f64:
            status = f"yes, under torch.set_default_dtype(float64) ({wl.default_f64[row]})"
        out[row] = {"status": status, "rel_err": err}
    return out


class _quiet:
    """Silence warnings (implicit's residual warning on an unsolved problem is expected)."""

    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def timing(name: str, rounds: int, burst: int, cap_s: float) -> dict[str, dict[str, Any]]:
    wl = BUILDERS[name](torch.float32)
    rows = list(wl.rows)
    single: dict[str, list[float]] = {r: [] for r in rows}
    bursts: dict[str, list[float]] = {r: [] for r in rows}
    slow: dict[str, float] = {}
    with _quiet():
        for r in rows:  # warm-up (twice: lazy imports, then caches)
            try:
                wl.rows[r]()
                t0 = time.perf_counter()
                wl.rows[r]()
                dt = time.perf_counter() - t0
                if dt > cap_s:
                    slow[r] = dt
            except Exception as e:
                slow[r] = math.nan
                print(f"  {name} {r}: {type(e).__name__}: {e}", flush=True)
        live = [r for r in rows if r not in slow]
        for i in range(rounds):
            order = live[i % len(live) :] + live[: i % len(live)] if live else []
            for r in order:
                fn = wl.rows[r]
                gc.collect()
                t0 = time.perf_counter()
                fn()
                single[r].append(time.perf_counter() - t0)
                gc.collect()
                t0 = time.perf_counter()
                for _ in range(burst):
                    fn()
                bursts[r].append((time.perf_counter() - t0) / burst)
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r in slow:
            out[r] = {"single_ms": 1000 * slow[r], "burst_ms": None, "once": True}
        else:
            out[r] = {
                "single_ms": 1000 * statistics.median(single[r]),
                "burst_ms": 1000 * statistics.median(bursts[r]),
                "single_all_ms": [1000 * t for t in single[r]],
                "burst_all_ms": [1000 * t for t in bursts[r]],
                "once": False,
            }
    return out


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _memory_child(builder: Callable[[torch.dtype], Workload], row: str) -> float:
    """Peak RSS growth (MB) of one call, measured in this (fresh, forked) process."""
    wl = builder(torch.float32)
    fn = wl.rows[row] if row in wl.rows else wl.memory_rows[row]
    with _quiet():
        fn()  # warm-up: lazy imports, kernels, allocator pools
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) / 1024.0


def memory(builder: Callable[[torch.dtype], Workload], row: str) -> float | str:
    """Fork a fresh process for one (workload, row) cell."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            val: Any = _memory_child(builder, row)
        except Exception as e:
            val = f"{type(e).__name__}: {str(e)[:80]}"
        os.write(w, json.dumps(val).encode())
        os.close(w)
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data.decode()) if data else "child failed"


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    return {
        "lscpu_head": lscpu.splitlines()[:20],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "higher": version("higher") if higher is not None else f"unavailable ({HIGHER_ERR})",
        "torchopt": version("torchopt")
        if torchopt is not None
        else f"unavailable ({TORCHOPT_ERR})",
        "metagrad": version("metagrad"),
        "threads": torch.get_num_threads(),
    }


def _ok(status: str) -> bool:
    return status == "reference" or status.startswith("yes")


def fastest_correct(res: dict[str, Any], single: bool = True) -> str | None:
    key = "single_ms" if single else "burst_ms"
    ok = [
        r
        for r, g in res["gate"].items()
        if _ok(g["status"]) and res["time"].get(r, {}).get(key) is not None
    ]
    return min(ok, key=lambda r: res["time"][r][key]) if ok else None


def table(name: str, res: dict[str, Any]) -> str:
    t = res["time"]
    ok_peers = [
        r
        for r, g in res["gate"].items()
        if not r.startswith("metagrad") and _ok(g["status"]) and t.get(r, {}).get("burst_ms")
    ]
    best_peer = min(ok_peers, key=lambda r: t[r]["burst_ms"]) if ok_peers else None
    lines = [
        f"### {name}: {res['describe']}",
        "",
        f"1-min load average at start / end of timing: {res['load'][0]:.2f} / "
        f"{res['load'][1]:.2f}; {res.get('rounds')} rounds, bursts of {res.get('burst')}",
        "",
        "| impl | correct? (rel err) | single call ms | burst ms/call | ratio vs best peer (burst) | peak MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r, g in res["gate"].items():
        err = "" if g["rel_err"] is None else f" ({g['rel_err']:.1e})"
        row_t = t.get(r, {})
        s = row_t.get("single_ms")
        b = row_t.get("burst_ms")
        single = "—" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s:.1f}"
        if row_t.get("once"):
            single += " (once; not repeated)"
        burst = "—" if b is None else f"{b:.1f}"
        ratio = (
            f"{b / t[best_peer]['burst_ms']:.2f}x"
            if b is not None and best_peer is not None and _ok(g["status"])
            else ""
        )
        mem = res["memory"].get(r)
        mem_s = "—" if mem is None else f"{mem:.1f}" if isinstance(mem, (int, float)) else str(mem)
        label = f"**{r}**" if r.startswith("metagrad") else r
        lines.append(f"| {label} | {g['status']}{err} | {single} | {burst} | {ratio} | {mem_s} |")
    fast = fastest_correct(res, single=False)
    fast1 = fastest_correct(res, single=True)
    lines += [
        "",
        f"Best correct peer (burst): {best_peer}. Fastest correct row: {fast} (burst), {fast1} "
        f"(single call). `auto` runs `{AUTO_PICKS.split()[1]}` here, which is "
        + ("" if _auto_best(res) else "NOT ")
        + f"the fastest correct metagrad strategy (fastest: {_fastest_metagrad(res)}).",
        "",
    ]
    return "\n".join(lines)


def _fastest_metagrad(res: dict[str, Any]) -> str | None:
    t = res["time"]
    ok = [
        r
        for r, g in res["gate"].items()
        if r.startswith("metagrad")
        and r != "metagrad auto"
        and _ok(g["status"])
        and t.get(r, {}).get("burst_ms")
    ]
    return min(ok, key=lambda r: t[r]["burst_ms"]) if ok else None


AUTO_PICKS = "metagrad unroll"
"""What ``strategy="auto"`` runs for one (unbatched) problem: the unrolled loop."""


def _auto_best(res: dict[str, Any]) -> bool:
    """Whether the strategy ``auto`` picks is the fastest correct metagrad strategy.

    ``auto`` runs the same code as the strategy it picks, so its own row differs from that one by
    timing noise only; the picked strategy's row is compared (within 5% counts as a tie).
    """
    t, best = res["time"], _fastest_metagrad(res)
    picked = t.get(AUTO_PICKS, {}).get("burst_ms")
    if best is None or not picked:
        return False
    return best == AUTO_PICKS or picked <= 1.05 * t[best]["burst_ms"]


def memory_table(mem: dict[str, dict[str, Any]]) -> str:
    cols = [c for c in GRID if c in mem]
    if not cols:
        return ""
    rows = sorted(
        {r for c in cols for r in mem[c]}, key=lambda r: (not r.startswith("metagrad"), r)
    )
    lines = [
        "### peak memory (MB) against K and the model size (unrolled SGD-momentum, MLP 64-H-10)",
        "",
        "| impl | " + " | ".join(c.replace("unroll-", "") for c in cols) + " |",
        "| --- |" + " --- |" * len(cols),
    ]
    for r in rows:
        cells = []
        for c in cols:
            v = mem[c].get(r)
            cells.append(
                "—" if v is None else f"{v:.1f}" if isinstance(v, (int, float)) else str(v)
            )
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def wait_for_load(max_load: float, wait_s: float) -> float:
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.time() - t0 > wait_s:
            return load
        print(f"load {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--burst", type=int, default=3)
    ap.add_argument("--cap-s", type=float, default=4.0, help="rows slower than this are timed once")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-gate", action="store_true")
    ap.add_argument("--max-load", type=float, default=2.0, help="wait for a 1-min load below this")
    ap.add_argument("--wait-s", type=float, default=0.0, help="how long to wait for it")
    ap.add_argument(
        "--memory-grid",
        action="store_true",
        help="only the peak-memory table against K and the model size (no gate, no timing)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument(
        "--report", nargs="+", default=None, help="only print the tables of these --json files"
    )
    args = ap.parse_args()
    if args.report:
        report(args.report, args.markdown)
        return
    torch.set_num_threads(1)
    info = machine()
    print(json.dumps({k: v for k, v in info.items() if k != "lscpu_head"}), flush=True)
    results: dict[str, Any] = {}
    if args.memory_grid:
        grid = {}
        for name in GRID:
            grid[name] = memory_cells({**BUILDERS, **MEMORY_ONLY}[name])
            print(f"{name}: memory {json.dumps(grid[name])}", flush=True)
        text = memory_table(grid)
        print("\n" + text)
        if args.markdown:
            Path(args.markdown).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "memory_grid": grid}, indent=1))
        return
    for name in args.only:
        res: dict[str, Any] = {"describe": BUILDERS[name](torch.float32).describe}
        res["gate"] = {} if args.no_gate else gate(name)
        print(f"{name}: gate {json.dumps(res['gate'])}", flush=True)
        load0 = wait_for_load(args.max_load, args.wait_s)
        res["time"] = timing(name, args.rounds, args.burst, args.cap_s)
        res["load"] = (load0, os.getloadavg()[0])
        res["rounds"], res["burst"] = args.rounds, args.burst
        print(
            f"{name}: time {json.dumps({k: (v['single_ms'], v['burst_ms']) for k, v in res['time'].items()})}",
            flush=True,
        )
        res["memory"] = {}
        if not args.no_memory:
            res["memory"] = memory_cells(BUILDERS[name])
            print(f"{name}: memory {json.dumps(res['memory'])}", flush=True)
        if args.no_gate:
            res["gate"] = {r: {"status": "not gated", "rel_err": None} for r in res["time"]}
        results[name] = res
    extra_mem: dict[str, dict[str, Any]] = {
        n: r["memory"] for n, r in results.items() if r["memory"]
    }
    if not args.no_memory and any(n.startswith("unroll-K") for n in args.only):
        for name, builder in MEMORY_ONLY.items():
            extra_mem[name] = memory_cells(builder)
            print(f"{name}: memory {json.dumps(extra_mem[name])}", flush=True)
    text = render(info, vars(args), results, extra_mem)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "args": vars(args), "results": results, "memory_grid": extra_mem},
                indent=1,
            )
        )


def render(
    info: dict[str, Any],
    args: dict[str, Any],
    results: dict[str, Any],
    extra_mem: dict[str, dict[str, Any]],
) -> str:
    cpu = "; ".join(
        x.split(":", 1)[0].strip() + ": " + x.split(":", 1)[1].strip()
        for x in info["lscpu_head"]
        if x.startswith(("Model name", "CPU(s)", "Thread"))
    )
    header = [
        f"machine: {cpu}",
        f"python {info['python']}, torch {info['torch']}, higher {info['higher']}, torchopt "
        f"{info['torchopt']}, metagrad {info['metagrad']}; torch threads: {info['threads']}",
        "",
    ]
    return (
        "\n".join(header)
        + "\n".join(table(n, r) for n, r in results.items())
        + "\n"
        + memory_table(extra_mem)
    )


def report(paths: list[str], markdown: str | None) -> None:
    """The tables of several runs' --json files (one invocation per workload keeps runs short)."""
    results: dict[str, Any] = {}
    extra: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    args: dict[str, Any] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        info, args = data["machine"], data["args"]
        results.update(data["results"])
        extra.update(data["memory_grid"])
    text = render(info, args, results, extra)
    print(text)
    if markdown:
        Path(markdown).write_text(text)


if __name__ == "__main__":
    main()
