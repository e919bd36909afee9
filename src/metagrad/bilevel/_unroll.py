r"""Unrolled reverse mode: the inner loop's graph kept (``create_graph``), one problem at a time.

For problem :math:`i` the whole trajectory :math:`w_0 \to w_K` is recorded with
``torch.autograd.grad(create_graph=True)`` and differentiated once; its graph is freed before the
next problem, so memory is one problem's unrolled graph (it grows with the number of steps).
This is the reference every other strategy is tested against.

``truncate=k`` keeps the graph of the last ``k`` steps only (truncated backpropagation through
time): :math:`w_{K-k}` is treated as a constant, a biased estimate with memory of ``k`` steps.
The initialization then gets no gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from metagrad._errors import check_finite
from metagrad.bilevel._foreign import foreign_leaves
from metagrad.bilevel._inner import AutogradBackend, run, trainable_start
from metagrad.bilevel._problem import HyperGrad, MetaParams, Problem
from metagrad.bilevel._tree import Flat, GradSum, accumulate, count_problems, index, tree_detach


def unroll(
    problem: Problem,
    mp: MetaParams,
    inner_data: Any,
    outer_data: Any,
    *,
    batched: bool,
    need_grad: bool = True,
    truncate: int | None = None,
    find_foreign: bool = True,
) -> HyperGrad:
    """Mean outer objective over problems and its gradient, by the unrolled loop."""
    flat = Flat(mp, need_grad)
    run_mp = mp if need_grad else flat.detached()
    P = count_problems(problem.name, inner_data, outer_data) if batched else 1
    totals: dict[int, Any] = GradSum()
    foreign: list[torch.Tensor] = []
    foreign_tot: list[torch.Tensor | None] = []
    losses = []
    w_last = None
    for i in range(P):
        di = index(inner_data, i) if batched else inner_data
        do = index(outer_data, i) if batched else outer_data
        at = i if batched else None
        with torch.enable_grad():
            w_start = trainable_start(run_mp.w0)
            # A value-only pass (validation) needs no differentiable inner gradient.
            second = problem.order == 2 and need_grad
            backend = AutogradBackend(problem, at, create_graph=second)
            obj, w, _ = run(
                problem, backend, w_start, run_mp.h, run_mp.opt, di, do, truncate=truncate, index=at
            )
            assert obj is not None
            if problem.check_finite:
                check_finite(problem.name, obj, problem.outer_name, at, None, problem.unit)
            if need_grad:
                if i == 0 and find_foreign and obj.requires_grad:
                    known = [*flat.leaves, *w_start.values()]
                    foreign = foreign_leaves([obj], known)
                    foreign_tot = [None] * len(foreign)
                inputs = [flat.leaves[j] for j in flat.wrt] + foreign
                if inputs and obj.requires_grad:
                    gs = torch.autograd.grad(obj / P, inputs, allow_unused=True)
                    for j, g in zip(flat.wrt, gs):
                        accumulate(totals, j, g)
                    for j, g in enumerate(gs[len(flat.wrt) :]):
                        if g is not None:
                            prev = foreign_tot[j]
                            foreign_tot[j] = g if prev is None else prev + g
        losses.append(obj.detach())
        w_last = w
    per = torch.stack(losses)
    pairs = [(t, g) for t, g in zip(foreign, foreign_tot) if g is not None]
    return HyperGrad(
        value=per.mean(),
        per_problem=per,
        grads=flat.grads(totals),
        foreign=pairs,
        w=None if batched or w_last is None else tree_detach(w_last),
        strategy="unroll" if truncate is None else "truncated",
    )
