r"""The adjoint and checkpoint strategies batched over problems with ``torch.func.vmap``.

The same backward chain of vector-Jacobian products as :mod:`metagrad.bilevel._adjoint`

.. math::
    v_K = c_K \nabla_w g(w_K),\qquad
    (v_k, u_k, \bar\phi) \mathrel{+}=
      \Bigl(\frac{\partial F_k}{\partial (w_k, s_k, \phi)}\Bigr)^{\!\top} (v_{k+1}, u_{k+1})
      + c_k \nabla g(w_k),

run for all ``P`` problems at once: each reverse step recomputes the step ``vmap``-ped over the
problems and takes one autograd VJP through it (as a hand-written vmap loop differentiates)
instead of ``P`` autograd calls, so the per-problem Python and dispatch cost is paid once per
step. Memory is still flat in ``K``: the iterates :math:`(w_k, s_k)` of all problems
(``P`` parameter copies and optimizer states per kept step, in blocks allocated once) and one
step's graph at a time. ``every=m`` keeps every ``m``-th iterate and recomputes segments
(checkpoint).

Used where the default strategy batches (``vmap_ok`` problems: stock layers whose batched
double backward is exact). Closed-over tensors cannot be reached under ``vmap``
(:class:`ForeignUnderVmap`): the caller then runs the per-problem version, which finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad._typing import Params
from metagrad.bilevel._adjoint import Iterates
from metagrad.bilevel._batched import batched_grads, batched_update, vmap_flat
from metagrad.bilevel._foreign import foreign_leaves
from metagrad.bilevel._inner import batch_at, resolved_optimizer
from metagrad.bilevel._problem import HyperGrad, MetaParams, Optimizer, Problem
from metagrad.bilevel._tree import Flat, count_problems, index, is_plain, plain_leaves, tree_detach
from metagrad.bilevel._vmap import ForeignUnderVmap

State = tuple[Params, Any]


class Walk(NamedTuple):
    """Where a reverse step's search for closed-over tensors looks: the step's forward graph
    (``roots``, the inner losses) and, from the step's outputs, the update up to the inner
    gradients (``stops``). The double-backward nodes between them hold only tensors of the
    forward graph, so skipping them (31 of a step's 76 nodes on the sinusoid MLP) loses no
    leaf; a custom ``autograd.Function`` whose backward closes over a tensor that requires grad
    is the one exception, and the batched path runs only where the caller vouched for the
    objectives (``vmap_ok``)."""

    roots: list[Tensor]
    stops: list[Tensor]


BATCH_BYTES = 2**28
"""Budget (bytes) for what the problems batched together hold at once (256 MiB): their kept
iterates and one reverse step's activations. More problems than fit run in groups; where not
even two fit, the adjoint runs problem by problem (the batch would only multiply the memory)."""


def group_size(
    problem: Problem, flat: Flat, inner_data: Any, every: int | None, budget: int | None = None
) -> int:
    """How many problems one vmapped group may hold within ``budget``.

    Per problem: the kept iterates plus the reverse step's working copies
    (:func:`_bank_bytes_per_problem`), plus twice the tensors that problem 0's first inner
    forward and differentiable backward save for the double backward (measured once with
    ``saved_tensors_hooks``; the reverse step holds that graph and its VJP's transients).
    """
    mp = flat.leaves_as_tree()
    batch = batch_at(problem, index(inner_data, 0), 0)
    w = {n: v.detach().requires_grad_(v.is_floating_point()) for n, v in mp.w0.items()}
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = problem.call_inner(w, problem.hyper(tree_detach(mp.h)), batch, 0)
            inputs = [v for v in w.values() if v.requires_grad]
            if loss.requires_grad and inputs:
                torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    except Exception:  # the per-problem chain reports it, with its explanation
        return 1
    per_problem = _bank_bytes_per_problem(problem, flat, every) + 2 * saved
    return max(1, (BATCH_BYTES if budget is None else budget) // max(1, per_problem))


def adjoint_vmapped(
    problem: Problem,
    flat: Flat,
    inner_data: Any,
    outer_data: Any,
    *,
    every: int | None,
    check: bool,
    group: int,
) -> tuple[HyperGrad, Tensor | None]:
    """Mean outer objective over the ``P`` batched problems and its exact gradient.

    Problems are vmapped in groups of ``group`` (see :func:`group_size`). Returns the result and
    one finiteness flag over all outputs (None when ``check`` is off).
    """
    P = count_problems(problem.name, inner_data, outer_data)
    pers: list[Tensor] = []
    sums: dict[int, Tensor] = {}
    for start in range(0, P, group):
        part = slice(start, min(P, start + group))
        per, part_sums = _group(
            problem, flat, index(inner_data, part), index(outer_data, part), every
        )
        pers.append(per)
        for j, g in part_sums.items():
            sums[j] = g if j not in sums else sums[j] + g
    per = torch.cat(pers)
    totals: dict[int, Tensor | None] = {j: g / P for j, g in sums.items()}
    # Closed-over tensors were refused step by step (_pull): nothing here requires grad.
    outs = [per, *(g for g in totals.values() if g is not None)]
    finite = torch.cat([o.reshape(-1) for o in outs]).isfinite().all() if check else None
    name = "adjoint" if every is None else "checkpoint"
    res = HyperGrad(per.mean(), per.detach(), flat.grads(totals), [], strategy=name)
    return res, finite


def _bank_bytes_per_problem(problem: Problem, flat: Flat, every: int | None) -> int:
    """Bytes one problem adds to a batch: (parameters + optimizer state) x (kept steps + the
    reverse step's working copies)."""
    w0 = flat.leaves_as_tree().w0
    state = resolved_optimizer(problem, flat.leaves_as_tree().opt).init(
        {n: v.detach() for n, v in w0.items()}
    )
    leaves = [x for x in pytree.tree_leaves((w0, state)) if isinstance(x, Tensor)]
    one = sum(x.numel() * x.element_size() for x in leaves)
    K = problem.steps
    kept = K if every is None else K // max(1, every) + 1 + every
    # + the per-problem working copies of a reverse step (adjoints, VJP outputs, gradients)
    return one * (max(1, kept) + 4)


def _group(
    problem: Problem, flat: Flat, inner_data: Any, outer_data: Any, every: int | None
) -> tuple[Tensor, dict[int, Tensor]]:
    """One group of problems: per-problem objectives and the gradients summed over them."""
    P = count_problems(problem.name, inner_data, outer_data)
    K = problem.steps
    n0 = flat.n_w0
    phi_idx = [j for j in flat.wrt if j >= n0]
    consts = [x.detach() if isinstance(x, Tensor) else x for x in flat.leaves]
    phi = [consts[j] for j in phi_idx]
    w0_names = list(flat.leaves_as_tree().w0)
    w0_wrt = {w0_names[j]: j for j in flat.wrt if j < n0}

    def tree(values: list[Tensor]) -> MetaParams:
        leaves = list(consts)
        for j, v in zip(phi_idx, values):
            leaves[j] = v
        return MetaParams(*pytree.tree_unflatten(leaves, flat.spec))

    # Only w_0 differentiated (MAML): h and the optimizer are the same at every step.
    fixed: tuple[Any, Optimizer] | None = None
    if not phi_idx:
        mp0 = tree([])
        fixed = problem.hyper(mp0.h), resolved_optimizer(problem, mp0.opt)

    def hyper_at(values: list[Tensor]) -> tuple[Any, Optimizer]:
        if fixed is not None:
            return fixed
        mp = tree(values)
        return problem.hyper(mp.h), resolved_optimizer(problem, mp.opt)

    create_graph = problem.order == 2

    def inner_grads(w: Params, h: Any, k: int, batch: Any, graph: bool) -> tuple[Params, Tensor]:
        # ``graph``: keep it for the VJP that follows (the reverse step's recompute).
        return batched_grads(lambda x, d: problem.call_inner(x, h, d, k), w, batch, graph)

    def lrs_at(h: Any, k: int, w: Params) -> dict[str, Any] | None:
        return {n: problem.lr(h, k, n) for n in w} if problem.lr is not None else None

    def step(w: Params, s: Any, values: list[Tensor], k: int, batch: Any) -> tuple[State, Walk]:
        # A reverse step's recompute on batched (w, s), differentiable in (w, s, phi); also
        # what the search for closed-over tensors walks (see _pull).
        h, opt = hyper_at(values)
        grads, losses = inner_grads(w, h, k, batch, create_graph)
        out = batched_update(opt, grads, s, w, k, lrs_at(h, k, w))
        return out, Walk([losses], list(grads.values()))

    mp_fwd = tree(phi)
    h_fwd, opt_fwd = hyper_at(phi)

    def advance(w: Params, s: Any, k: int) -> State:
        # The forward sweep keeps no graph: first-order gradients, the same batched update.
        with torch.enable_grad():
            a = {n: v.detach().requires_grad_() for n, v in w.items()}
            grads, _ = inner_grads(a, h_fwd, k, batch_at(problem, inner_data, k), False)
        return batched_update(opt_fwd, grads, s, w, k, lrs_at(h_fwd, k, w))

    w = {n: v.expand(P, *v.shape) for n, v in mp_fwd.w0.items()}
    s = torch.func.vmap(opt_fwd.init)(w)
    # The forward sweep stops at w_{K-1}: the last step's VJP computes w_K as its primal.
    iterates = Iterates(advance, (w, s), max(K - 1, 0), every)

    if K == 0:
        v, g_phi, per = _outer_grads(problem, tree, phi, w, outer_data, 0)
    else:
        w_last, s_last = iterates.get(K - 1)
        c_K = problem.weight(K)
        batch = batch_at(problem, inner_data, K - 1)
        with torch.enable_grad():
            a, b, p_r = _inputs(w_last), _inputs(s_last), [x.detach().requires_grad_() for x in phi]

            (new, _), walk = step(a, b, p_r, K - 1, batch)
            h_r = hyper_at(p_r)[0]
            vals = vmap_flat(lambda x, do: problem.call_outer(x, h_r, do, K), new, outer_data)
            # One backward of c_K * sum_p g_p(F(w_p, s_p, phi), phi): each problem's VJP of the
            # last step with its outer gradient, plus phi's direct term, summed over problems.
            v, u, g_phi = _pull(problem, [c_K * vals.sum()], [None], a, b, p_r, walk)
        per = c_K * vals.detach()
        for k in range(K - 1, -1, -1):
            c = problem.weight(k)
            if c != 0.0:
                gw, gp, val = _outer_grads(problem, tree, phi, iterates.get(k)[0], outer_data, k)
                v = {n: v[n] + c * gw[n] for n in v}
                g_phi = [x + c * y for x, y in zip(g_phi, gp)]
                per = per + c * val
            if k == 0:
                break
            w_prev, s_prev = iterates.get(k - 1)
            batch = batch_at(problem, inner_data, k - 1)
            with torch.enable_grad():
                a, b = _inputs(w_prev), _inputs(s_prev)
                p_r = [x.detach().requires_grad_() for x in phi]
                (new, s_new), walk = step(a, b, p_r, k - 1, batch)
                outs = [*plain_leaves(new), *plain_leaves(s_new)]
                cots = [*plain_leaves(v), *plain_leaves(u)]
                v, u, gp = _pull(problem, outs, cots, a, b, p_r, walk)
            g_phi = [x + y for x, y in zip(g_phi, gp)]
    assert per is not None
    sums = dict(zip(phi_idx, g_phi))
    for n, j in w0_wrt.items():
        sums[j] = v[n].sum(0)
    return per, sums


def _inputs(tree_: Any) -> Any:
    """``tree_`` with its floating-point tensors detached and requiring grad (the inputs of one
    reverse step's autograd call); other leaves unchanged."""

    def one(t: Any) -> Any:
        return t.detach().requires_grad_() if isinstance(t, Tensor) and t.is_floating_point() else t

    if is_plain(tree_):  # the parameters, and stateless optimizers' state: no pytree walk
        return type(tree_)({n: one(t) for n, t in tree_.items()}) if tree_ else tree_
    return pytree.tree_map(one, tree_)


def _pull(
    problem: Problem,
    outputs: list[Any],
    cotangents: list[Any],
    w: Params,
    s: Any,
    phi: list[Tensor],
    walk: Walk | None = None,
) -> tuple[Params, Any, list[Tensor]]:
    """Cotangents of ``(w, s, phi)`` from ``outputs`` (vmapped over problems) and theirs.

    One autograd call through the vmapped step, as a hand-written vmap loop differentiates (an
    outer ``torch.func.vjp`` level would wrap every op of the step again). ``phi`` is shared by
    the problems, so its cotangent comes back summed over them. A ``None`` cotangent means a
    scalar output (ones). Raises :class:`ForeignUnderVmap` if the graph reaches a leaf that
    requires grad besides the inputs (a closed-over tensor: the per-problem chain finds it);
    ``walk`` narrows that search to a step's forward graph and update (see :class:`Walk`).
    """
    pairs = [
        (o, c) for o, c in zip(outputs, cotangents) if isinstance(o, Tensor) and o.requires_grad
    ]
    outs, cots = [o for o, _ in pairs], [c for _, c in pairs]
    w_in, s_in = list(w.values()), plain_leaves(s)
    inputs = [*w_in, *(t for t in s_in if isinstance(t, Tensor) and t.requires_grad), *phi]
    roots, stops = outs, inputs
    if walk is not None:  # stop at the inner gradients: their nodes hold no other leaf
        roots = [*outs, *walk.roots]
        stops = [*inputs, *(g for g in walk.stops if g.grad_fn is not None)]
    if outs and foreign_leaves(roots, stops):
        raise ForeignUnderVmap(
            f"{problem.name}: an objective (or the optimizer) closes over a tensor that requires "
            f"grad, which the batched adjoint cannot reach."
        )
    if outs:
        grads = list(
            torch.autograd.grad(
                outs, inputs, grad_outputs=cots, allow_unused=True, materialize_grads=True
            )
        )
    else:
        grads = [torch.zeros_like(t) for t in inputs]
    it = iter(grads)
    dw = {n: next(it) for n in w}
    if is_plain(s) and not s:
        ds = s
    else:
        ds = pytree.tree_map(
            lambda t: next(it) if isinstance(t, Tensor) and t.requires_grad else t, s
        )
    return dw, ds, list(it)


def _outer_grads(
    problem: Problem,
    tree: Callable[[list[Tensor]], MetaParams],
    phi: list[Tensor],
    w: Params,
    outer_data: Any,
    k: int,
) -> tuple[Params, list[Tensor], Tensor]:
    r""":math:`\nabla_w g(w_k)` per problem, :math:`\nabla_\phi g(w_k)` summed over problems, and
    :math:`g(w_k)` per problem."""
    with torch.enable_grad():
        a = _inputs(w)
        p_r = [x.detach().requires_grad_() for x in phi]
        vals = torch.func.vmap(
            lambda x, d: problem.call_outer(x, problem.hyper(tree(p_r).h), d, k),
            randomness="same",
        )(a, outer_data)
        gw, _, gp = _pull(problem, [vals.sum()], [None], a, {}, p_r)
    return gw, gp, vals.detach()
