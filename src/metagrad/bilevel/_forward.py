r"""Forward mode: Jacobian-vector products through the whole training run.

For each scalar hyperparameter :math:`h_j` one ``torch.func.jvp`` carries the tangent
:math:`\partial w_k/\partial h_j` along the trajectory next to :math:`w_k` (forward over reverse:
the inner gradient is a ``torch.func.grad`` whose tangent is a Hessian-vector product), so

.. math::
    \frac{\partial G}{\partial h_j} = \sum_k c_k \Bigl(\nabla_w g(w_k)\cdot
    \frac{\partial w_k}{\partial h_j} + \frac{\partial g}{\partial h_j}\Bigr).

Nothing is stored across steps: memory is flat in the number of steps and in the model size
(one extra tangent per tensor), and the cost is one training run per scalar hyperparameter.
The right choice for a handful of scalars (learning rate, weight decay), not for a network's
initialization.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad.bilevel._inner import FuncBackend, run
from metagrad.bilevel._problem import HyperGrad, MetaParams, Problem
from metagrad.bilevel._tree import Flat, count_problems, index
from metagrad.bilevel._vmap import ForeignUnderVmap
from metagrad.derivatives._forward_ad_fix import MeanMSEAsNone, is_forward_ad_gap
from metagrad.functional._attention import higher_order_attention

MAX_FORWARD_DIMS = 4096
"""More scalar hyperparameters than this and forward mode is refused (reverse mode is cheaper)."""


def forward_mode(
    problem: Problem, flat: Flat, inner_data: Any, outer_data: Any, *, batched: bool
) -> HyperGrad:
    """Mean outer objective and its gradient, one forward-mode pass per scalar hyperparameter."""
    diff = [flat.leaves[i].detach() for i in flat.wrt]
    dims = sum(d.numel() for d in diff)
    if dims > MAX_FORWARD_DIMS:
        names = flat.names()
        big = [f"{names[i]} ({flat.leaves[i].numel()})" for i in flat.wrt]
        raise ValueError(
            f"{problem.name}: strategy='forward' costs one training run per scalar "
            f"hyperparameter, and {dims} are differentiated ({', '.join(big[:4])}...). Use "
            f"strategy='adjoint' (reverse mode, memory flat in steps) or set requires_grad=False "
            f"on the tensors you do not need (limit: {MAX_FORWARD_DIMS})."
        )
    P = count_problems(problem.name, inner_data, outer_data) if batched else 1
    backend = FuncBackend(create_graph=problem.order == 2)
    spec, wrt = flat.spec, flat.wrt
    base: list[Any] = [x.detach() if isinstance(x, Tensor) else x for x in flat.leaves]

    def objective(d: list[Tensor]) -> tuple[Tensor, Tensor]:
        leaves = list(base)
        for i, v in zip(wrt, d):
            leaves[i] = v
        mp = MetaParams(*pytree.tree_unflatten(leaves, spec))
        vals = []
        for i in range(P):
            di = index(inner_data, i) if batched else inner_data
            do = index(outer_data, i) if batched else outer_data
            obj, _, _ = run(problem, backend, mp.w0, mp.h, mp.opt, di, do)
            assert obj is not None
            vals.append(obj)
        per = torch.stack(vals)
        return per.mean(), per.detach()

    grads = [torch.zeros_like(d) for d in diff]
    value: Tensor | None = None
    per: Tensor | None = None
    try:
        # Every forward runs under jvp, and the fused attention kernels have no forward-mode
        # formula (nor a double backward): the math kernel throughout.
        with MeanMSEAsNone(), higher_order_attention():
            if not diff:
                value, per = objective(diff)
            for j, d in enumerate(diff):
                for e in range(d.numel()):
                    tangent = [torch.zeros_like(x) for x in diff]
                    tangent[j].view(-1)[e] = 1.0
                    out = torch.func.jvp(objective, (diff,), (tangent,), has_aux=True)
                    value, dval, per = out[0], out[1], out[2]  # type: ignore[misc]
                    grads[j].view(-1)[e] = dval
    except RuntimeError as err:
        if not is_forward_ad_gap(err):
            raise
        raise ValueError(
            f"{problem.name}: strategy='forward' needs a forward-mode derivative of every "
            f"operation in the objectives, and PyTorch has none for one of them "
            f"({str(err).splitlines()[0]}). Use strategy='adjoint' or 'unroll' (reverse mode)."
        ) from err
    assert value is not None and per is not None
    if value.requires_grad:
        raise ForeignUnderVmap(
            f"{problem.name}: an objective closes over a tensor that requires grad, and "
            f"strategy='forward' cannot deliver its gradient. Pass it in h, or use "
            f"strategy='unroll', which gives closed-over tensors their exact gradient."
        )
    return HyperGrad(value.detach(), per, flat.grads(dict(zip(wrt, grads))), strategy="forward")
