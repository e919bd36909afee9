r"""iMAML's tasks in one batch: the proximal inner solves batched over tasks (vmapped forward,
one autograd call, an elementwise update), the implicit solves as one batched conjugate gradient.

For tasks :math:`i = 1..T` with solutions :math:`t^\star_i` the meta-gradient is
:math:`g = \frac1T\sum_i \lambda u_i` with :math:`(H_i + \lambda(1 + d) I)\,u_i = \nabla L^q_i(
t^\star_i)` (:mod:`metagrad.algorithms._imaml`). Since the tasks share no weights, one autograd
graph of :math:`\sum_i L^s_i(t_i)` over batched :math:`t = [t_1..t_T]` gives every
:math:`\nabla L^s_i(t_i)` at once, and one backward of it with cotangent :math:`[p_1..p_T]` gives
every :math:`H_i p_i`. CG runs per task on those batched products: each task keeps its own
:math:`\alpha, \beta` and stops at the same tolerance as the per-task solver (a stopped task's
iterate is frozen), so the iterates are those of :func:`metagrad.bilevel.cg` task by task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad import optim
from metagrad._typing import Buffers, LossFn, Params
from metagrad.algorithms._task import refuse_closed_update
from metagrad.bilevel._batched import batched_update
from metagrad.bilevel._foreign import foreign_leaves
from metagrad.functional._attention import higher_order_attention

Forward = Callable[[Params, Buffers, Tensor], Tensor]


@dataclass(frozen=True)
class BatchedCG:
    """Per-task outcome of :func:`batched_cg`.

    Attributes:
        x: solutions, each leaf ``[T, *shape]``.
        iterations: CG iterations each task ran, ``[T]`` (0 where its right-hand side is 0).
        residual: relative residuals :math:`\\|r_i\\| / \\|b_i\\|`, ``[T]`` (0 where ``b_i = 0``).
        indefinite: ``[T]`` bools: task ``i`` met a direction with :math:`p^\\top (A_i +
            \\text{shift}\\, I) p \\le 0` (as :attr:`metagrad.bilevel.SolveResult.indefinite`).
    """

    x: Params
    iterations: Tensor
    residual: Tensor
    indefinite: Tensor


def _dot(a: Params, b: Params) -> Tensor:
    """Per-task inner products ``[T]`` of batched parameter dicts."""
    return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)  # type: ignore[return-value]


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def batched_cg(
    matvec: Callable[[Params], Params], b: Params, steps: int, tol: float, shift: float = 0.0
) -> BatchedCG:
    r"""Solve :math:`(A_i + \text{shift}\,I) x_i = b_i` for every task ``i`` by CG at once.

    ``matvec`` maps batched ``[p_1..p_T]`` to ``[A_1 p_1..A_T p_T]``. Task ``i`` stops once
    :math:`\|r_i\| \le \text{tol}\,\|b_i\|` or after ``steps`` iterations, exactly as
    :func:`metagrad.bilevel.cg` does on it alone; its iterate is frozen from then on.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rs = _dot(r, r)
    b_norm = rs.sqrt()
    active = b_norm > 0
    iterations = torch.zeros_like(rs, dtype=torch.long)
    indefinite = torch.zeros_like(rs, dtype=torch.bool)
    floor = float(torch.finfo(rs.dtype).eps) ** 0.5
    one = torch.ones_like(rs)
    for _ in range(steps):
        if not bool(active.any()):
            break
        ap = matvec(p)
        if shift:
            ap = {k: ap[k] + shift * p[k] for k in ap}
        pap = _dot(p, ap)
        # CG assumes p^T A p > 0 (counted above the rounding floor, as bilevel.cg does)
        live = active & (rs.sqrt() > floor * b_norm)
        indefinite = indefinite | (live & (pap <= 0))
        alpha = torch.where(active, rs / torch.where(active, pap, one), 0.0)
        x = {k: x[k] + _col(alpha, x[k]) * p[k] for k in x}
        r = {k: r[k] - _col(alpha, r[k]) * ap[k] for k in r}
        rs_new = _dot(r, r)
        iterations = iterations + active.long()
        done = rs_new.sqrt() <= tol * b_norm
        beta = torch.where(active, rs_new / torch.where(active, rs, one), 0.0)
        go = active & ~done
        p = {k: torch.where(_col(go, p[k]), r[k] + _col(beta, p[k]) * p[k], p[k]) for k in p}
        rs = torch.where(active, rs_new, rs)
        active = go
    residual = torch.where(b_norm > 0, rs.sqrt() / torch.where(b_norm > 0, b_norm, one), 0.0)
    return BatchedCG(x, iterations, residual, indefinite)


IMPLICIT_ONLY = "iMAML's implicit gradient depends on the inner solution only"
"""Why iMAML refuses what the inner updates close over (:func:`refuse_closed_update`)."""


def solve_proximal(
    forward: Forward,
    loss_fn: LossFn,
    opt: optim.Optimizer,
    theta: Params,
    buffers: Buffers,
    xs: Tensor,
    ys: Tensor,
    *,
    lam: float,
    lr: float,
    steps: int,
    fn_name: str = "metagrad.IMAML",
) -> Params:
    r"""``steps`` optimizer steps on :math:`L^s_i(t) + \frac\lambda2\|t - \theta\|^2` from
    :math:`t = \theta` for every task at once (detached; leaves ``[T, *shape]``)."""
    anchor = {k: v.detach() for k, v in theta.items()}
    lrs: dict[str, float | Tensor] = {k: lr for k in anchor}
    T = xs.shape[0]

    def objective(t: Params, x: Tensor, y: Tensor) -> Tensor:
        prox = sum(((t[n] - anchor[n]) ** 2).sum() for n in t)
        return loss_fn(forward(t, buffers, x), y) + 0.5 * lam * prox

    # Per step: the tasks' gradients from one autograd call on their summed vmapped objectives
    # (the tasks share no weights), the update on the batched leaves (batched_update: vmap's
    # per-op cost is ~10x a small MLP's SGD update).
    t = {k: v.expand(T, *v.shape).clone() for k, v in anchor.items()}
    state = torch.func.vmap(opt.init)(t)
    for k in range(steps):
        with torch.enable_grad():
            a = {n: v.detach().requires_grad_() for n, v in t.items()}
            losses = torch.func.vmap(objective, randomness="different")(a, xs, ys)
            gs = torch.autograd.grad(losses.sum(), list(a.values()))
        t, state = batched_update(opt, dict(zip(a, gs)), state, t, k, lrs)
        if k == 0:
            refuse_closed_update(t, fn_name, IMPLICIT_ONLY)
    return {n: v.detach() for n, v in t.items()}


@dataclass(frozen=True)
class BatchedImplicit:
    """Outcome of :func:`implicit_gradients` (all detached).

    Attributes:
        query: per-task query losses at the solutions, ``[T]``.
        grads: per-task implicit meta-gradients :math:`\\lambda u_i`, leaves ``[T, *shape]``.
        cg: the batched CG (iterations and residuals per task).
        residual: per-task optimality residuals :math:`\\|F_i\\| / (1 + \\|t^\\star_i\\|)`, ``[T]``.
        foreign: tensors requiring grad that the loss closes over, with the gradient of the
            *mean* query loss (not per task).
    """

    query: Tensor
    grads: Params
    cg: BatchedCG
    residual: Tensor
    foreign: list[tuple[Tensor, Tensor]]


def implicit_gradients(
    forward: Forward,
    loss_fn: LossFn,
    t_star: Params,
    anchor: Params,
    buffers: Buffers,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    lam: float,
    cg_steps: int,
    damping: float,
    tol: float,
    fn_name: str,
) -> BatchedImplicit:
    r"""Per-task query losses and :math:`\lambda (H_i + \lambda(1 + d) I)^{-1}\nabla L^q_i`.

    A tensor :math:`\phi` that the loss closes over gets the gradient of the mean query loss,
    :math:`\frac1T\sum_i \partial_\phi L^q_i - (\partial_\phi \nabla L^s_i)^\top u_i`
    (the implicit function theorem with :math:`\phi` as one more hyperparameter).

    Raises:
        ValueError: a parameter does not reach the support loss (as the per-task path does).
    """
    xs, ys, xq, yq = tasks
    names = list(t_star)
    w = {k: v.detach().requires_grad_() for k, v in t_star.items()}
    leaves = [w[k] for k in names]

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return torch.func.vmap(
            lambda t, a, b: loss_fn(forward(t, buffers, a), b), randomness="different"
        )(w, x, y)

    with torch.enable_grad():
        with higher_order_attention():  # CG differentiates this gradient (Hessian products)
            support = losses(xs, ys)
        gs = torch.autograd.grad(support.sum(), leaves, create_graph=True, allow_unused=True)
        unused = [n for n, g in zip(names, gs) if g is None]
        q = losses(xq, yq)
        stray = foreign_leaves([support, q], leaves)
        gq_all = torch.autograd.grad(q.sum(), [*leaves, *stray], allow_unused=True)
        gq, direct = gq_all[: len(leaves)], gq_all[len(leaves) :]
    if unused:
        raise ValueError(
            f"{fn_name}: parameters {unused} do not reach the support loss; iMAML needs every "
            f"trainable parameter in it. Freeze them with requires_grad=False."
        )
    b = {n: (g if g is not None else torch.zeros_like(w[n])) for n, g in zip(names, gq)}
    grad_list = [g for g in gs if g is not None]

    def hvp(v: Params) -> Params:
        with torch.enable_grad():
            out = torch.autograd.grad(grad_list, leaves, [v[n] for n in names], retain_graph=True)
        return dict(zip(names, out))

    # (H_i + lam I + lam d I) u_i = grad L^q_i: custom_root's system for F = grad L^s + lam (t - theta).
    sol = batched_cg(hvp, b, cg_steps, tol, shift=lam * (1.0 + damping))
    F = {n: g.detach() + lam * (w[n].detach() - anchor[n].detach()) for n, g in zip(names, gs)}
    f_norm = _dot(F, F).sqrt()
    t_norm = _dot(t_star, t_star).sqrt()
    grads = {n: lam * u for n, u in sol.x.items()}
    foreign: list[tuple[Tensor, Tensor]] = []
    if stray:
        used = [(g, sol.x[n]) for n, g in zip(names, gs) if g is not None]
        with torch.enable_grad():
            through = torch.autograd.grad(
                [g for g, _ in used], stray, [u for _, u in used], allow_unused=True
            )
        T = q.shape[0]
        for t, d, th in zip(stray, direct, through):
            total = (torch.zeros_like(t) if d is None else d) - (0 if th is None else th)
            foreign.append((t, total.detach() / T))
    return BatchedImplicit(q.detach(), grads, sol, f_norm / (1.0 + t_norm), foreign)
