r"""Exact meta-gradients without storing the inner loop's graph (``strategy="hvp_chain"``).

For an inner loop :math:`(t_{k+1}, s_{k+1}) = F_k(t_k, s_k; \phi)` (parameters :math:`t`,
optimizer state :math:`s`, everything else meta-learned :math:`\phi`: non-adapted weights,
learned rates, per-step norm weights) and objective :math:`\sum_k w_k L_q(t_k; \phi)`, reverse
mode runs backwards over the steps with adjoints :math:`(v_k, u_k)`:

.. math::
    v_K = w_K \nabla_t L_q(t_K),\qquad
    (v_k, u_k, \bar\phi) \mathrel{+}= \bigl(\tfrac{\partial F_k}{\partial (t_k, s_k, \phi)}\bigr)^{\top}
    (v_{k+1}, u_{k+1}) + w_k \nabla L_q(t_k),\qquad g_\theta = v_0 .

For SGD :math:`F_k(t) = t - a_k \nabla L_s(t)`, so the step is
:math:`v_k = (I - a_k H_k) v_{k+1}`, one Hessian-vector product at the stored iterate
:math:`t_k`, and :math:`\partial/\partial a_k = -v_{k+1}\cdot\nabla L_s(t_k)`.

Only the iterates :math:`t_k, s_k` are stored (``K`` copies of the adapted parameters), never
the activations of the whole unrolled loop: each step's graph is rebuilt from :math:`t_k`, used
for one vector-Jacobian product and freed. Memory is that of one inner step, at the price of one
extra forward/backward per step. The result equals the ``create_graph`` loop to rounding.

``strategy="checkpoint"`` keeps only every ``ceil(sqrt(K))``-th iterate and recomputes each
segment when the backward pass reaches it: :math:`O(\sqrt K)` parameter copies for one more
forward pass of the inner loop.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from metagrad._errors import check_finite
from metagrad._typing import Buffers, LossFn, Params
from metagrad.functional._inner import AutogradBackend, InnerSpec, inner_step, query_loss
from metagrad.functional._model import FunctionalModel
from metagrad.functional._optim import OptState


def _leaves(d: dict[str, Tensor], like: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Fresh leaf copies (sharing storage) that require grad where the meta-parameter does."""
    return {
        k: v.detach().requires_grad_(
            v.is_floating_point() and (like is None or like[k].requires_grad)
        )
        for k, v in d.items()
    }


def _add(acc: dict[str, Tensor | None], key: str, g: Tensor | None) -> None:
    if g is not None:
        prev = acc[key]
        acc[key] = g if prev is None else prev + g


def task_adjoint(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    buffers: Buffers,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    task: int,
    every: int | None = None,
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """One task's objective and its exact gradient by the backward HVP chain.

    Args:
        every: keep every ``every``-th iterate only and recompute the rest (checkpointing);
            None keeps all ``K`` iterates.

    Returns:
        ``(objective, grads)`` with grads keyed ``"theta:<name>"`` / ``"extra:<name>"``.
    """
    K = spec.steps
    names = spec.adapt_names
    fixed = _leaves({n: t for n, t in theta.items() if n not in names}, theta)
    ex = _leaves(extra)
    phi = {
        **{f"theta:{k}": v for k, v in fixed.items()},
        **{f"extra:{k}": v for k, v in ex.items()},
    }
    phi_wrt = [k for k, v in phi.items() if v.requires_grad]
    grads: dict[str, Tensor | None] = {f"theta:{k}": None for k in theta}
    grads.update({f"extra:{k}": None for k in extra})

    # Forward: iterates only (first-order backend: no second-order graph is built here).
    # With ``every`` set, only every ``every``-th iterate is kept and the others are recomputed
    # segment by segment during the backward pass (gradient checkpointing across inner steps).
    fwd = AutogradBackend(dataclasses.replace(spec, order=1, check_finite=False), task)
    fwd_checked = AutogradBackend(dataclasses.replace(spec, order=1), task)

    def advance(
        t: Params, state: OptState, k: int, backend: AutogradBackend
    ) -> tuple[Params, OptState]:
        with torch.enable_grad():
            a = {n: v.detach().requires_grad_() for n, v in t.items()}
            new, new_state, _ = inner_step(
                fm, loss_fn, spec, backend, fixed, ex, buffers, a, state, k, xs, ys
            )
        return {n: v.detach() for n, v in new.items()}, {
            n: v.detach() for n, v in new_state.items()
        }

    stride = 1 if every is None else max(1, every)
    t: Params = {n: theta[n].detach() for n in names}
    state: OptState = spec.optimizer.init(t)
    stored: dict[int, tuple[Params, OptState]] = {}
    for k in range(K):
        if k % stride == 0:
            stored[k] = (t, state)
        t, state = advance(t, state, k, fwd_checked)
    stored[K] = (t, state)
    segment: dict[int, tuple[Params, OptState]] = {}

    def iterate(k: int) -> tuple[Params, OptState]:
        if k in stored:
            return stored[k]
        if k not in segment:
            segment.clear()  # keep one segment at a time: O(K / every + every) copies
            base = (k // stride) * stride
            t_, s_ = stored[base]
            for j in range(base + 1, min(base + stride, K)):
                t_, s_ = advance(t_, s_, j - 1, fwd)
                segment[j] = (t_, s_)
        return segment[k]

    def weight(k: int) -> float:
        if spec.step_weights is None or K == 0:
            return 1.0 if k == K else 0.0
        return spec.step_weights[k - 1] if k >= 1 else 0.0

    objective = torch.zeros(
        (), dtype=xq.dtype if xq.is_floating_point() else torch.float32, device=xq.device
    )
    v: dict[str, Tensor] = {n: torch.zeros_like(x) for n, x in t.items()}
    u: dict[str, Tensor] = {n: torch.zeros_like(x) for n, x in state.items()}
    back = AutogradBackend(spec, task)
    for k in range(K, -1, -1):
        t_k = iterate(k)[0]
        w = weight(k)
        if w != 0.0:
            with torch.enable_grad():
                a = {n: x.detach().requires_grad_() for n, x in t_k.items()}
                q = query_loss(fm, loss_fn, spec, fixed, ex, buffers, a, k, xq, yq)
                if spec.check_finite:
                    check_finite(spec.fn_name, q, "query loss", task, None)
                gs = torch.autograd.grad(
                    w * q, [*a.values(), *(phi[p] for p in phi_wrt)], allow_unused=True
                )
            objective = objective + w * q.detach()
            for n, g in zip(a, gs[: len(a)]):
                if g is not None:
                    v[n] = v[n] + g
            for p, g in zip(phi_wrt, gs[len(a) :]):
                _add(grads, p, g)
        if k == 0:
            break
        # Backward through step k-1: rebuild its graph from the stored iterate, one VJP, free it.
        t_prev, s_prev = iterate(k - 1)
        with torch.enable_grad():
            a = {n: x.detach().requires_grad_() for n, x in t_prev.items()}
            s = {n: x.detach().requires_grad_() for n, x in s_prev.items()}
            new, new_state, _ = inner_step(
                fm, loss_fn, spec, back, fixed, ex, buffers, a, s, k - 1, xs, ys
            )
            outs = [(new[n], v[n]) for n in new] + [(new_state[n], u[n]) for n in new_state]
            outs = [(o, c) for o, c in outs if o.requires_grad]
            inputs = [*a.values(), *s.values(), *(phi[p] for p in phi_wrt)]
            gs = torch.autograd.grad(
                [o for o, _ in outs], inputs, [c for _, c in outs], allow_unused=True
            )
        na, ns = len(a), len(s)
        v = {n: (torch.zeros_like(a[n]) if g is None else g) for n, g in zip(a, gs[:na])}
        u = {n: (torch.zeros_like(s[n]) if g is None else g) for n, g in zip(s, gs[na : na + ns])}
        for p, g in zip(phi_wrt, gs[na + ns :]):
            _add(grads, p, g)
    for n in names:
        if theta[n].requires_grad:
            _add(grads, f"theta:{n}", v[n])
    return objective, grads
