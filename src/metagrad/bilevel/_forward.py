r"""Forward mode: Jacobian-vector products through the whole training run.

Every scalar hyperparameter :math:`h_j` has a tangent :math:`\partial w_k/\partial h_j` carried
along the trajectory next to :math:`w_k` (forward over reverse: the inner gradient is a
``torch.func.grad`` whose tangent is a Hessian-vector product), so

.. math::
    \frac{\partial G}{\partial h_j} = \sum_k c_k \Bigl(\nabla_w g(w_k)\cdot
    \frac{\partial w_k}{\partial h_j} + \frac{\partial g}{\partial h_j}\Bigr).

All the tangents travel together: ``torch.func.vmap`` over a batch of one-hot tangent directions
around one ``torch.func.jvp`` of the inner loop, so one (batched) training run gives the whole
gradient. The directions go ``chunk_size`` at a time (default :func:`default_chunk_size`: at
most :data:`CHUNK_SIZE`, fewer for large models so the tangents stay within
:data:`TANGENT_BUDGET` elements per carried tensor); the run is repeated once per chunk.
Objectives that cannot be vmapped (``.item()``, data-dependent control flow, in-place updates
of buffers...) fall back to one ``jvp`` per scalar hyperparameter, the same numbers more slowly
(logged at INFO on the ``metagrad`` logger; with a :class:`Cache` later calls skip the
batched attempt). Random ops (dropout) draw one sample shared by all directions
(``randomness="same"``), so every direction differentiates the same run.

Nothing is stored across steps: memory is flat in the number of steps; it grows with the
model size times the chunk size (one extra tangent per tensor and direction). The right choice
for a handful of scalars (learning rates, weight decay), not for a network's initialization.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad.bilevel._inner import FuncBackend, run
from metagrad.bilevel._problem import HyperGrad, MetaParams, Problem
from metagrad.bilevel._tree import Flat, count_problems, index
from metagrad.bilevel._vmap import Cache, ForeignUnderVmap, note_vmap_failure, signature
from metagrad.derivatives._forward_ad_fix import MeanMSEAsNone, is_forward_ad_gap
from metagrad.functional._attention import higher_order_attention

MAX_FORWARD_DIMS = 4096
"""More scalar hyperparameters than this and forward mode is refused (reverse mode is cheaper)."""

CHUNK_SIZE = 64
"""Most tangent directions pushed through the inner loop together (see :func:`default_chunk_size`)."""

TANGENT_BUDGET = 2**24
"""Elements of one batched tangent of the inner parameters the default chunk may reach (64 MiB
in float32): a model of ``n`` parameters gets ``TANGENT_BUDGET // n`` directions per chunk."""

Objective = Callable[[list[Tensor]], tuple[Tensor, Tensor]]


def default_chunk_size(dims: int, model_numel: int) -> int:
    """Directions per batched pass: all ``dims`` up to :data:`CHUNK_SIZE`, fewer for big models.

    Memory of a pass grows with ``chunk * model_numel`` (every parameter, inner gradient and
    optimizer state carries one tangent per direction); the default keeps ``chunk *
    model_numel <= TANGENT_BUDGET``.
    """
    return max(1, min(dims, CHUNK_SIZE, TANGENT_BUDGET // max(1, model_numel)))


def forward_mode(
    problem: Problem,
    flat: Flat,
    inner_data: Any,
    outer_data: Any,
    *,
    batched: bool,
    chunk_size: int | None = None,
    cache: Cache | None = None,
) -> HyperGrad:
    """Mean outer objective and its gradient by forward mode, ``chunk_size`` directions a pass.

    Args:
        chunk_size: tangent directions (scalar hyperparameters) pushed through the inner loop
            together; None: :func:`default_chunk_size`. 1 is the unbatched loop's memory.
        cache: remembers a problem whose objectives cannot be vmapped over tangent directions,
            so later calls go straight to the per-scalar loop.
    """
    diff = [flat.leaves[i].detach() for i in flat.wrt]
    dims = sum(d.numel() for d in diff)
    if dims > MAX_FORWARD_DIMS:
        names = flat.names()
        big = [f"{names[i]} ({flat.leaves[i].numel()})" for i in flat.wrt]
        raise ValueError(
            f"{problem.name}: strategy='forward' carries one tangent per scalar "
            f"hyperparameter through the training run, and {dims} are differentiated "
            f"({', '.join(big[:4])}...). Use strategy='adjoint' (reverse mode, memory flat in "
            f"steps) or set requires_grad=False on the tensors you do not need (limit: "
            f"{MAX_FORWARD_DIMS})."
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"{problem.name}: chunk_size={chunk_size!r} must be an int >= 1 (tangent directions "
            f"per forward-mode pass) or None for the default."
        )
    objective = _objective(problem, flat, inner_data, outer_data, batched)
    if chunk_size is None:
        model = sum(v.numel() for v in flat.leaves_as_tree().w0.values())
        chunk_size = default_chunk_size(dims, model)
    grads: list[Tensor] = []
    # Every forward runs under jvp, and the fused attention kernels have no forward-mode
    # formula (nor a double backward): the math kernel throughout.
    with MeanMSEAsNone(), higher_order_attention():
        if not diff:
            value, per = objective(diff)
        else:
            value, per, grads = _solve(problem, objective, diff, chunk_size, cache)
    if value.requires_grad:
        raise ForeignUnderVmap(
            f"{problem.name}: an objective closes over a tensor that requires grad, and "
            f"strategy='forward' cannot deliver its gradient. Pass it in h, or use "
            f"strategy='unroll', which gives closed-over tensors their exact gradient."
        )
    return HyperGrad(
        value.detach(), per, flat.grads(dict(zip(flat.wrt, grads))), strategy="forward"
    )


def _objective(
    problem: Problem, flat: Flat, inner_data: Any, outer_data: Any, batched: bool
) -> Objective:
    """``diff -> (mean outer objective, per-problem objectives detached)``."""
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

    return objective


def _solve(
    problem: Problem, objective: Objective, diff: list[Tensor], chunk: int, cache: Cache | None
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The batched pass, or the per-scalar loop where the objectives cannot be vmapped."""
    key = ("forward-no-vmap", signature(problem))
    if cache is None or key not in cache.checked:  # not known to fail from an earlier call
        try:
            return _batched(objective, diff, chunk)
        except RuntimeError as err:
            plain_ok = _runs_without_jvp(objective, diff)
            _explain(problem, err, plain_ok)
            if not plain_ok:
                raise  # the objectives fail by themselves: their own error, once
            # Not vmappable over tangent directions: one jvp per scalar, the same numbers.
            note_vmap_failure(
                cache,
                key,
                err,
                problem.name,
                "strategy='forward' could not vmap over tangent directions",
                "one jvp per scalar hyperparameter instead",
            )
    try:
        return _loop(objective, diff)
    except RuntimeError as err:
        _explain(problem, err, plain_ok=True)
        raise


def _batched(
    objective: Objective, diff: list[Tensor], chunk: int
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``vmap`` of ``jvp`` over one-hot tangents, ``chunk`` directions at a time."""
    sizes = [d.numel() for d in diff]
    dims = sum(sizes)

    def one(tangent: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        out = torch.func.jvp(objective, (diff,), (tangent,), has_aux=True)
        return out[0], out[1], out[2]  # type: ignore[misc]

    # randomness="same": every direction differentiates the same sampled run (dropout...).
    pushed = torch.func.vmap(one, randomness="same")
    dvals: list[Tensor] = []
    value = per = None
    for start in range(0, dims, chunk):
        n = min(chunk, dims - start)
        rows = torch.arange(n, device=diff[0].device)
        eye = torch.zeros(n, dims, dtype=torch.float64, device=diff[0].device)
        eye[rows, start + rows] = 1.0
        parts = eye.split(sizes, dim=1)
        tangents = [p.to(d.dtype).reshape(n, *d.shape) for p, d in zip(parts, diff)]
        values, dval, pers = pushed(tangents)
        value, per = values[0], pers[0]
        dvals.append(dval.detach())
    assert value is not None and per is not None
    flat = torch.cat([v.to(torch.float64) for v in dvals])
    grads = [g.reshape(d.shape).to(d.dtype) for g, d in zip(flat.split(sizes), diff)]
    return value, per, grads


def _loop(objective: Objective, diff: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One ``jvp`` per scalar hyperparameter (objectives that cannot be vmapped)."""
    grads = [torch.zeros_like(d) for d in diff]
    value = per = None
    for j, d in enumerate(diff):
        for e in range(d.numel()):
            tangent = [torch.zeros_like(x) for x in diff]
            tangent[j].view(-1)[e] = 1.0
            out = torch.func.jvp(objective, (diff,), (tangent,), has_aux=True)
            value, dval, per = out[0], out[1], out[2]  # type: ignore[misc]
            grads[j].view(-1)[e] = dval
    assert value is not None and per is not None
    return value, per, grads


_DTYPE_MISMATCH = re.compile(r"dtype|scalar type", re.IGNORECASE)


def _explain(problem: Problem, err: RuntimeError, plain_ok: bool) -> None:
    """Raise the clear error for the forward-mode failures PyTorch reports obscurely.

    ``plain_ok``: the objectives run without tangents, so the failure is forward mode's.
    """
    msg = str(err)
    if is_forward_ad_gap(err):
        raise ValueError(
            f"{problem.name}: strategy='forward' needs a forward-mode derivative of every "
            f"operation in the objectives, and PyTorch has none for one of them "
            f"({msg.splitlines()[0]}). Use strategy='adjoint' or 'unroll' (reverse mode)."
        ) from err
    if plain_ok and _DTYPE_MISMATCH.search(msg) and "double" in msg.lower():
        # torch 2.13: under torch.func.jvp, `python_scalar * zero_dim_tensor` gets a float64
        # tangent for a float32 tensor (the scalar is not treated as a weak "wrapped number"),
        # and the first matmul that meets it fails on mixed dtypes.
        raise ValueError(
            f"metagrad.bilevel.hypergrad(strategy='forward') ({problem.name}): the objectives "
            f"run, but their forward-mode derivative fails on mixed float32/float64 dtypes "
            f"({msg.splitlines()[0]}). This is a known torch 2.13 float32 forward-mode dtype "
            f"issue: a Python scalar times a 0-d tensor, e.g. `0.5 * lam * reg` with lam a "
            f"scalar hyperparameter tensor, gets a float64 tangent. Fix: write "
            f"`0.5 * (lam * reg)` (tensor times tensor first), use float64 tensors, or use "
            f"another strategy (strategy='unroll' or 'adjoint')."
        ) from err


def _runs_without_jvp(objective: Objective, diff: list[Tensor]) -> bool:
    """Whether the plain forward pass (no tangents) succeeds: the failure is forward mode's."""
    try:
        objective(diff)
    except Exception:
        return False
    return True
