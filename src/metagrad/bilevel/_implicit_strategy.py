r"""``strategy="implicit"``: the inner loop as a solver, differentiated at its solution.

The inner optimizer runs its ``steps`` without any graph to reach :math:`w^\star \approx
\arg\min_w f(w, h)`; the stationarity condition :math:`F(w, h) = \nabla_w f(w, h) = 0` then gives
the hypergradient by the implicit function theorem (:func:`metagrad.bilevel.custom_root`):

.. math::
    \frac{dG}{dh} = \frac{\partial g}{\partial h}
      - \Bigl(\frac{\partial^2 f}{\partial h\,\partial w}\Bigr)^{\!\top}
        \Bigl(\nabla^2_{w} f\Bigr)^{-1} \nabla_w g(w^\star, h),

one linear solve (CG on Hessian-vector products by default), in time and memory independent of
the number of inner steps. It equals the unrolled gradient only when the inner problem is solved
(a warning reports the stationarity residual otherwise) and gives no gradient for the
initialization, which a solved problem does not depend on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad._errors import check_finite
from metagrad._typing import Params
from metagrad.bilevel._foreign import add_pairs, foreign_leaves
from metagrad.bilevel._implicit import custom_root
from metagrad.bilevel._inner import AutogradBackend, run
from metagrad.bilevel._problem import HyperGrad, MetaParams, PerStep, Problem
from metagrad.bilevel._tree import (
    Flat,
    GradSum,
    accumulate,
    count_problems,
    fresh_leaf,
    index,
    tree_detach,
)
from metagrad.functional._attention import higher_order_attention


@dataclass(frozen=True)
class ImplicitOptions:
    """Linear-solve settings of ``strategy="implicit"`` (see :func:`custom_root`)."""

    solve: str = "cg"
    maxiter: int = 100
    tol: float = 1e-10
    damping: float = 0.0
    residual_tol: float = 1e-6


def implicit(
    problem: Problem,
    flat: Flat,
    inner_data: Any,
    outer_data: Any,
    *,
    batched: bool,
    options: ImplicitOptions,
) -> HyperGrad:
    """Mean outer objective at the inner solutions and its implicit gradient."""
    if isinstance(inner_data, PerStep):
        raise ValueError(
            f"{problem.name}: strategy='implicit' differentiates the solution of one inner "
            f"problem, so the inner data must be one batch, not PerStep batches (a stochastic "
            f"inner loop has no fixed solution). Use strategy='adjoint' for changing batches."
        )
    P = count_problems(problem.name, inner_data, outer_data) if batched else 1
    n0 = flat.n_w0
    hyper_idx = [j for j in flat.wrt if j >= n0]
    totals: dict[int, Tensor | None] = GradSum()
    foreign: dict[int, tuple[Tensor, Tensor]] = {}  # by id: the same tensor in every problem
    losses = []
    w_last: Params | None = None
    for i in range(P):
        di = index(inner_data, i) if batched else inner_data
        do = index(outer_data, i) if batched else outer_data
        at = i if batched else None
        obj, gs, stray, w_star = _one(problem, flat, hyper_idx, di, do, at, options)
        losses.append(obj)
        for j, g in zip(hyper_idx, gs):
            accumulate(totals, j, None if g is None else g / P)
        add_pairs(foreign, stray, 1.0 / P)
        w_last = w_star
    per = torch.stack(losses)
    return HyperGrad(
        per.mean(),
        per,
        flat.grads(totals),
        foreign=list(foreign.values()),
        w=None if batched or w_last is None else w_last,
        strategy="implicit",
    )


def _one(
    problem: Problem,
    flat: Flat,
    hyper_idx: list[int],
    inner_data: Any,
    outer_data: Any,
    at: int | None,
    options: ImplicitOptions,
) -> tuple[Tensor, list[Tensor | None], list[tuple[Tensor, Tensor]], Params]:
    """One problem: outer value, hypergradients (``hyper_idx`` order), the closed-over
    tensors with their gradients, and the solution."""
    leaves = [fresh_leaf(x) for x in flat.leaves]
    keys = [str(j) for j in hyper_idx]

    def rebuild(hd: Params) -> MetaParams:
        vals = list(leaves)
        for j, k in zip(hyper_idx, keys):
            vals[j] = hd[k]
        return MetaParams(*pytree.tree_unflatten(vals, flat.spec))

    def optimality(w: Params, hd: Params) -> Params:
        mp = rebuild(hd)
        # custom_root differentiates this gradient (Hessian products): attention on a kernel
        # with a double backward.
        with torch.enable_grad(), higher_order_attention():
            loss = problem.call_inner(w, problem.hyper(mp.h), inner_data, problem.steps)
            names = list(w)
            gs = torch.autograd.grad(
                loss, [w[n] for n in names], create_graph=True, allow_unused=True
            )
        return {n: torch.zeros_like(w[n]) if g is None else g for n, g in zip(names, gs)}

    def solver(w_init: Params, hd: Params) -> Params:
        mp = rebuild({k: v.detach() for k, v in hd.items()})
        first = dataclasses.replace(problem, order=1)
        with torch.enable_grad():
            start = {n: v.detach().requires_grad_(v.is_floating_point()) for n, v in w_init.items()}
            # truncate=0: every step's gradient a constant, no graph across steps
            backend = AutogradBackend(first, at, create_graph=False)
            _, w, _ = run(
                first, backend, start, mp.h, mp.opt, inner_data, None, truncate=0, index=at
            )
        return w

    solve = custom_root(
        optimality,
        solve=options.solve,
        maxiter=options.maxiter,
        tol=options.tol,
        damping=options.damping,
        residual_tol=options.residual_tol,
        allow_unused=True,
    )(solver)
    hd = {k: leaves[j] for j, k in zip(hyper_idx, keys)}
    mp0 = rebuild(hd)
    with torch.enable_grad():
        w_star = solve({n: v.detach() for n, v in mp0.w0.items()}, hd)
        q = problem.call_outer(w_star, problem.hyper(mp0.h), outer_data, problem.steps)
        if problem.check_finite:
            check_finite(problem.name, q, problem.outer_name, at, None, problem.unit)
        inputs = [hd[k] for k in keys]
        # Closed-over tensors: in the outer objective directly, or in the inner one (custom_root
        # makes them inputs of the solution's node): both differentiated like h.
        stray = foreign_leaves([q], [*leaves, *inputs]) if q.requires_grad else []
        wrt = [*inputs, *stray]
        gs = (
            torch.autograd.grad(q, wrt, allow_unused=True)
            if wrt and q.requires_grad
            else [None] * len(wrt)
        )
    n = len(inputs)
    pairs = [(t, g) for t, g in zip(stray, gs[n:]) if g is not None]
    return q.detach(), list(gs[:n]), pairs, tree_detach(w_star)
