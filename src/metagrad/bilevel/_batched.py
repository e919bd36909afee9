"""Batched building blocks of the vmapped strategies: the optimizer update on leaves batched as
``[P, *shape]`` and ``vmap`` over flat leaves.

Used by the default vmapped path, the batched adjoint and batched iMAML, where each inner step
is one ``vmap`` of the objectives plus an autograd call (as a hand-written vmap loop runs),
not a ``torch.func.grad`` level inside one ``vmap`` of the whole loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metagrad import optim
from metagrad._compat import pytree
from metagrad._typing import Params
from metagrad.bilevel._problem import Optimizer
from metagrad.functional._attention import attention_for

State = tuple[Params, Any]

# Optimizers whose update is elementwise per parameter with a Python step count: on leaves
# batched as [P, *shape] with scalar hyperparameters it computes exactly what vmap of it does.
_ELEMENTWISE = (optim.SGD, optim.Adam, optim.AdamW)


def batched_update(
    opt: Optimizer,
    grads: Params,
    state: Any,
    w: Params,
    k: int,
    lrs: dict[str, Any] | None,
) -> State:
    """``vmap(opt.update)`` over the problems' leading dimension, without ``vmap`` when the
    update is elementwise with scalar hyperparameters (SGD, Adam, AdamW: vmap's per-op
    dispatch costs ~10x the update itself on a small MLP; BENCHMARKS.md)."""
    scalar = lrs is None or all(not isinstance(v, Tensor) or v.dim() == 0 for v in lrs.values())
    if type(opt) in _ELEMENTWISE and scalar and not any(opt._shaped):  # type: ignore[attr-defined]
        out: State = opt.update(grads, state, w, k, lrs)
        return out
    res: State = torch.func.vmap(lambda x, g, st: opt.update(g, st, x, k, lrs))(w, grads, state)
    return res


def vmap_flat(
    fn: Callable[[Params, Any], Tensor], w: Params, data: Any, randomness: str = "same"
) -> Tensor:
    """``vmap(fn)(w, data)`` over the leading dimension, with the leaves passed flat: vmap's
    handling of a nested input tree (``in_dims`` broadcast, flatten, unflatten) costs more than
    one unflatten inside (measured: 68 vs 75 us per call with six parameters and two data
    tensors, ~10 calls per 5-step meta-step)."""
    names = list(w)
    n = len(names)
    leaves, spec = pytree.tree_flatten(data)

    def flat_fn(*xs: Tensor) -> Tensor:
        return fn(dict(zip(names, xs[:n])), pytree.tree_unflatten(list(xs[n:]), spec))

    out: Tensor = torch.func.vmap(flat_fn, randomness=randomness)(*w.values(), *leaves)
    return out


def batched_grads(
    fn: Callable[[Params, Any], Tensor],
    w: Params,
    batch: Any,
    create_graph: bool,
    randomness: str = "same",
) -> tuple[Params, Tensor]:
    """Every problem's inner gradient at one step, and the per-problem losses ``[P]``.

    One autograd call on the sum of the vmapped losses: the problems share no weights, so the
    sum's gradient for problem ``p``'s copy is problem ``p``'s gradient (``torch.func.grad``
    inside ``vmap`` would wrap every op of the step again). Weights that do not require grad or
    do not reach the loss get zeros. ``create_graph`` keeps the graph for a second derivative.
    """
    with attention_for(create_graph):
        losses = vmap_flat(fn, w, batch, randomness)
        names = [n for n, v in w.items() if v.requires_grad]
        gs: list[Tensor | None] | tuple[Tensor | None, ...] = [None] * len(names)
        if losses.requires_grad and names:
            gs = torch.autograd.grad(
                losses.sum(), [w[n] for n in names], create_graph=create_graph, allow_unused=True
            )
    got = dict(zip(names, gs))
    grads = {n: torch.zeros_like(v) if got.get(n) is None else got[n] for n, v in w.items()}
    return grads, losses  # type: ignore[return-value]
