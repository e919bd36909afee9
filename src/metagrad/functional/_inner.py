r"""One task's inner loop and query loss, written once for both autograd backends.

For task :math:`i` with support :math:`(x^s, y^s)` and query :math:`(x^q, y^q)`:

.. math::
    t_0 = \theta,\qquad t_{k+1} = U(t_k, \nabla_t L_s(t_k), a_k),\qquad
    \mathcal{L}_i(\theta) = \sum_{k=1}^{K} w_k\, L_q(t_k)\quad (w = e_K \text{ by default}),

where :math:`U` is the inner optimizer. ``order=2`` keeps the graph of
:math:`\nabla_t L_s` (exact meta-gradient, with the Hessian terms
:math:`\prod_k (I - a_k H_k)` for SGD); ``order=1`` treats the inner gradients as constants.

The gradient of the inner loss is taken by a *backend*: :class:`AutogradBackend`
(``torch.autograd.grad``, used by the per-task loop) or :class:`FuncBackend`
(``torch.func.grad``, composable with ``vmap``). Everything else is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from metagrad._errors import check_finite
from metagrad._typing import Buffers, LossFn, Params
from metagrad.functional._model import FunctionalModel
from metagrad.functional._optim import LR, InnerOptimizer, OptState

LRRule = Callable[[Params, int, str], LR]
"""``lr_rule(extra, step, name)``: inner learning rate of parameter ``name`` at ``step``."""

StepParams = Callable[[Params, int], Params]
"""``step_params(extra, step)``: parameters that replace the model's at ``step`` (per-step BN)."""

StepBuffers = Callable[[int], Buffers]
"""``step_buffers(step)``: buffers (per-step running statistics) that replace the model's at ``step``."""


@dataclass(frozen=True)
class InnerSpec:
    """Static description of an inner loop (everything but the tensors)."""

    steps: int
    order: int
    optimizer: InnerOptimizer
    adapt_names: tuple[str, ...]
    lr_rule: LRRule
    step_params: StepParams | None = None
    step_buffers: StepBuffers | None = None
    step_weights: tuple[float, ...] | None = None
    allow_unused: bool = False
    check_finite: bool = True
    fn_name: str = "metagrad"


class GradBackend(Protocol):
    def __call__(
        self, f: Callable[[Params], Tensor], params: Params, step: int
    ) -> tuple[Params, Tensor]: ...


class AutogradBackend:
    """Inner gradients with ``torch.autograd.grad`` (``create_graph`` iff second order)."""

    def __init__(self, spec: InnerSpec, task: int | None) -> None:
        self.spec, self.task = spec, task

    def __call__(
        self, f: Callable[[Params], Tensor], params: Params, step: int
    ) -> tuple[Params, Tensor]:
        spec = self.spec
        loss = f(params)
        if spec.check_finite:
            check_finite(spec.fn_name, loss, "support loss", self.task, step)
        names = list(params)
        raw = torch.autograd.grad(
            loss, [params[n] for n in names], create_graph=spec.order == 2, allow_unused=True
        )
        missing = [n for n, g in zip(names, raw) if g is None]
        if missing and not spec.allow_unused:
            raise ValueError(
                f"{spec.fn_name}: parameters {missing} do not reach the support loss, so the inner "
                f"loop has no gradient for them. Pass allow_unused=True to leave them unadapted, or "
                f"exclude them from adaptation with adapt=... (or set requires_grad=False)."
            )
        grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, raw)}
        if spec.check_finite:
            for n, g in grads.items():
                check_finite(spec.fn_name, g, f"inner gradient of {n!r}", self.task, step)
        return grads, loss


class FuncBackend:
    """Inner gradients with ``torch.func.grad`` (vmappable; no data-dependent checks inside)."""

    def __init__(self, spec: InnerSpec) -> None:
        self.spec = spec

    def __call__(
        self, f: Callable[[Params], Tensor], params: Params, step: int
    ) -> tuple[Params, Tensor]:
        grads, loss = torch.func.grad_and_value(f)(params)
        if self.spec.order == 1:
            grads = {n: g.detach() for n, g in grads.items()}
        return grads, loss


def _scalar_loss(spec: InnerSpec, loss: object, which: str) -> Tensor:
    # Autograd's "grad can be implicitly created only for scalar outputs" does not say that
    # loss_fn is at fault; under vmap the shape seen here is the per-task one.
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{spec.fn_name}: loss_fn must return a scalar tensor (the mean loss over one task's "
            f"{which} examples), got {got}. Reduce it, e.g. reduction='mean' or .mean()."
        )
    return loss


def params_at(spec: InnerSpec, fixed: Params, extra: Params, adapted: Params, step: int) -> Params:
    """Full parameter dict used by the forward pass at inner ``step``."""
    full = {**fixed, **adapted}
    if spec.step_params is not None:
        full.update(spec.step_params(extra, step))
    return full


def buffers_at(spec: InnerSpec, buffers: Buffers, step: int) -> Buffers:
    """Buffers read by the forward pass at inner ``step`` (per-step statistics when configured)."""
    if spec.step_buffers is None:
        return buffers
    return {**buffers, **spec.step_buffers(step)}


def inner_step(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    backend: GradBackend,
    fixed: Params,
    extra: Params,
    buffers: Buffers,
    adapted: Params,
    state: OptState,
    step: int,
    xs: Tensor,
    ys: Tensor,
) -> tuple[Params, OptState, Tensor]:
    """One inner update ``(t_k, s_k) -> (t_{k+1}, s_{k+1})``; also returns the support loss."""

    step_bufs = buffers_at(spec, buffers, step)

    def support(a: Params) -> Tensor:
        fm.record_step = step
        pred = fm.forward(params_at(spec, fixed, extra, a, step), step_bufs, xs)
        return _scalar_loss(spec, loss_fn(pred, ys), "support")

    grads, loss = backend(support, adapted, step)
    lrs = {n: spec.lr_rule(extra, step, n) for n in adapted}
    new, state = spec.optimizer.update(grads, state, adapted, lrs, step)
    return new, state, loss


def query_loss(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    fixed: Params,
    extra: Params,
    buffers: Buffers,
    adapted: Params,
    step: int,
    xq: Tensor,
    yq: Tensor,
) -> Tensor:
    """Query loss of the parameters reached after ``step`` inner steps."""
    fm.record_step = step
    pred = fm.forward(
        params_at(spec, fixed, extra, adapted, step), buffers_at(spec, buffers, step), xq
    )
    return _scalar_loss(spec, loss_fn(pred, yq), "query")


def run_task(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    backend: GradBackend,
    theta: Params,
    extra: Params,
    buffers: Buffers,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor | None = None,
    yq: Tensor | None = None,
) -> tuple[Tensor | None, Params, list[Tensor]]:
    """Adapt ``theta`` on the support set; return (query objective, final params, support losses).

    The query objective is ``None`` when ``xq`` is None (pure adaptation).
    """
    adapted = {n: theta[n] for n in spec.adapt_names}
    fixed = {n: t for n, t in theta.items() if n not in adapted}
    state = spec.optimizer.init(adapted)
    support_losses: list[Tensor] = []
    objective: Tensor | None = None
    for k in range(spec.steps):
        adapted, state, loss = inner_step(
            fm, loss_fn, spec, backend, fixed, extra, buffers, adapted, state, k, xs, ys
        )
        support_losses.append(loss)
        if xq is not None and yq is not None and spec.step_weights is not None:
            if spec.step_weights[k] != 0.0:
                q = query_loss(fm, loss_fn, spec, fixed, extra, buffers, adapted, k + 1, xq, yq)
                objective = (
                    spec.step_weights[k] * q
                    if objective is None
                    else objective + spec.step_weights[k] * q
                )
    if xq is not None and yq is not None and (spec.step_weights is None or spec.steps == 0):
        objective = query_loss(
            fm, loss_fn, spec, fixed, extra, buffers, adapted, spec.steps, xq, yq
        )
    final = params_at(spec, fixed, extra, adapted, spec.steps)
    if spec.step_buffers is not None:  # predict() then reads the statistics of the last step
        final.update(spec.step_buffers(spec.steps))
    return objective, final, support_losses
