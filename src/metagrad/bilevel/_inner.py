r"""The inner loop, written once for every strategy and both autograd backends.

One step is :math:`(w_{k+1}, s_{k+1}) = U_k(w_k, \nabla_w f(w_k, h, b_k), s_k)`. The gradient of
the inner objective is taken by a *backend*: :class:`AutogradBackend`
(``torch.autograd.grad``; the unrolled, adjoint and truncated strategies) or
:class:`FuncBackend` (``torch.func.grad``; composes with ``vmap`` and ``jvp``). With
``create_graph`` the inner gradients stay differentiable (exact second order); without it they
are constants (first order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from metagrad._errors import check_finite
from metagrad._typing import Params
from metagrad.bilevel._problem import LR, Optimizer, PerStep, Problem
from metagrad.bilevel._tree import tree_detach
from metagrad.functional._attention import attention_for


class GradBackend(Protocol):
    def __call__(
        self, f: Callable[[Params], Tensor], w: Params, step: int
    ) -> tuple[Params, Tensor]: ...


class AutogradBackend:
    """Inner gradients with ``torch.autograd.grad``; checks unused parameters and NaN/Inf."""

    def __init__(self, problem: Problem, index: int | None, create_graph: bool) -> None:
        self.problem, self.index, self.create_graph = problem, index, create_graph
        self.check = problem.check_finite

    def __call__(
        self, f: Callable[[Params], Tensor], w: Params, step: int
    ) -> tuple[Params, Tensor]:
        pb = self.problem
        # create_graph: this forward's backward is differentiated again (attention on the math
        # kernel, the fused ones have no double backward; see functional/_attention.py).
        with attention_for(self.create_graph):
            loss = f(w)
        if self.check:
            check_finite(pb.name, loss, pb.inner_name, self.index, step, pb.unit)
        names = list(w)
        raw = torch.autograd.grad(
            loss, [w[n] for n in names], create_graph=self.create_graph, allow_unused=True
        )
        missing = [n for n, g in zip(names, raw) if g is None]
        if missing and not pb.allow_unused:
            raise ValueError(
                f"{pb.name}: parameters {missing} do not reach the {pb.inner_name}, so the inner "
                f"loop has no gradient for them. Pass allow_unused=True to leave them unadapted, or "
                f"exclude them from adaptation with adapt=... (or set requires_grad=False)."
            )
        grads = {n: torch.zeros_like(w[n]) if g is None else g for n, g in zip(names, raw)}
        if self.check:
            for n, g in grads.items():
                check_finite(pb.name, g, f"inner gradient of {n!r}", self.index, step, pb.unit)
        return grads, loss


class FuncBackend:
    """Inner gradients with ``torch.func.grad`` (vmappable, jvp-able; no data-dependent checks)."""

    def __init__(self, create_graph: bool) -> None:
        self.create_graph = create_graph

    def __call__(
        self, f: Callable[[Params], Tensor], w: Params, step: int
    ) -> tuple[Params, Tensor]:
        with attention_for(self.create_graph):
            grads, loss = torch.func.grad_and_value(f)(w)
        if not self.create_graph:
            grads = {n: g.detach() for n, g in grads.items()}
        return grads, loss


def batch_at(problem: Problem, data: Any, k: int) -> Any:
    """The inner batch of step ``k``."""
    if isinstance(data, PerStep):
        if k >= len(data.batches):
            raise ValueError(
                f"{problem.name}: PerStep holds {len(data.batches)} batches but step {k} needs "
                f"one; give at least steps={problem.steps} batches."
            )
        return data.batches[k]
    return data


def resolved_optimizer(problem: Problem, opt: dict[str, Tensor]) -> Optimizer:
    """The problem's optimizer with its tensor hyperparameters replaced by ``opt``."""
    return problem.optimizer.with_hyperparams(opt) if opt else problem.optimizer


def inner_step(
    problem: Problem,
    optimizer: Optimizer,
    backend: GradBackend,
    w: Params,
    h: Any,
    state: Any,
    k: int,
    batch: Any,
) -> tuple[Params, Any, Tensor]:
    """One inner update ``(w_k, s_k) -> (w_{k+1}, s_{k+1})``; also returns the inner loss."""
    grads, loss = backend(lambda a: problem.call_inner(a, h, batch, k), w, k)
    lrs: dict[str, LR] | None = None
    if problem.lr is not None:
        lrs = {n: problem.lr(h, k, n) for n in w}
    new, state = optimizer.update(grads, state, w, k, lrs)
    return new, state, loss


def trainable_start(w0: Params) -> Params:
    """``w0`` where every entry can be differentiated by autograd (a fresh leaf if it cannot)."""
    return {
        n: v if v.requires_grad or not v.is_floating_point() else v.detach().requires_grad_()
        for n, v in w0.items()
    }


def run(
    problem: Problem,
    backend: GradBackend,
    w0: Params,
    h: Any,
    opt: dict[str, Tensor],
    inner_data: Any,
    outer_data: Any = None,
    *,
    weights: Tensor | None = None,
    truncate: int | None = None,
    index: int | None = None,
) -> tuple[Tensor | None, Params, Any]:
    """Run the inner loop from ``w0``; return (outer objective or None, final w, final state).

    ``h`` is the raw hyperparameter tree: ``problem.prepare`` is applied here, once.

    Args:
        weights: the outer weights as a tensor (the compiled vmap path passes them as an input
            so that annealed weights do not recompile); default ``problem.weight(k)``.
        truncate: keep the graph of the last ``truncate`` steps only: the iterate before them
            is a constant (truncated backpropagation).
        index: the problem's index, for messages.
    """
    optimizer = resolved_optimizer(problem, opt)
    h = problem.hyper(h)
    K = problem.steps
    cut = None if truncate is None or truncate >= K else K - truncate
    w = w0
    state = optimizer.init(w)
    objective: Tensor | None = None
    for k in range(K):
        if cut is not None and k < cut:
            with torch.enable_grad():
                w = {n: v.detach().requires_grad_(v.is_floating_point()) for n, v in w.items()}
                first = AutogradBackend(problem, index, create_graph=False)
                w, state, _ = inner_step(
                    problem, optimizer, first, w, h, state, k, batch_at(problem, inner_data, k)
                )
            w = {n: v.detach() for n, v in w.items()}
            state = tree_detach(state)
            if k + 1 == cut:
                w = trainable_start(w)
        else:
            w, state, _ = inner_step(
                problem, optimizer, backend, w, h, state, k, batch_at(problem, inner_data, k)
            )
        if outer_data is not None and problem.outer_weights is not None:
            c = problem.weight(k + 1) if weights is None else weights[k]
            q = problem.call_outer(w, h, outer_data, k + 1)
            objective = c * q if objective is None else objective + c * q
    if outer_data is not None and (problem.outer_weights is None or K == 0):
        objective = problem.call_outer(w, h, outer_data, K)
    return objective, w, state
