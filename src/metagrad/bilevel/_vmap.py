r"""Independent problems at once: ``torch.func.grad`` of the mean of ``vmap`` over problems.

.. math::
    G = \frac1P \sum_{i=1}^{P} G_i(w_0, h),\qquad \nabla G = \texttt{grad}(\texttt{mean} \circ
    \texttt{vmap}(G_i))

Eagerly the inner loops run step by step on weights batched as ``[P, *shape]``: each step one
``vmap`` of the inner objectives and one autograd call on their sum, then one backward of the
mean outer objective (:func:`_per_step`). Compiled, ``torch.func.grad`` of one ``vmap`` of the
whole loops is traced as one graph.

Exact wherever the objectives' batched double backward is (stock linear/conv layers and
elementwise ops; not BatchNorm or LayerNorm, cf. pytorch/functorch#534: the caller decides).
Optionally ``torch.compile``-d once per problem structure and cached in a :class:`Cache` that the
caller owns; values that change every call (multi-step outer weights) enter as tensors, never
as part of the cache key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad._typing import Params
from metagrad.bilevel._batched import batched_grads, batched_update, vmap_flat
from metagrad.bilevel._foreign import foreign_leaves
from metagrad.bilevel._inner import AutogradBackend, FuncBackend, batch_at, resolved_optimizer, run
from metagrad.bilevel._problem import HyperGrad, MetaParams, PerStep, Problem
from metagrad.bilevel._tree import Flat, count_problems, index

_log = logging.getLogger("metagrad")


@dataclass
class Cache:
    """What a caller keeps between calls: compiled functions and passed one-time checks.

    Owned by whoever makes repeated calls (a learner, a training loop), never by the model or
    the problem, so two learners on one model do not share compiled code by accident.
    """

    compiled: dict[Any, Callable[..., Any]] = field(default_factory=dict)
    checked: set[Any] = field(default_factory=set)
    sizes: dict[Any, int] = field(default_factory=dict)  # measured once (batched adjoint groups)

    def __getstate__(self) -> dict[str, Any]:
        # compiled code neither copies nor pickles
        return {"compiled": {}, "checked": set(), "sizes": {}}


class ForeignUnderVmap(ValueError):
    """A closed-over tensor that requires grad reached the objective under ``vmap``/forward mode."""


def signature(problem: Problem) -> Problem:
    """The problem as a cache key: annealed outer weights change per call, so they are out."""
    if problem.outer_weights is None:
        return problem
    return dataclasses.replace(problem, outer_weights=None)


def note_vmap_failure(
    cache: Cache | None, key: Any, err: BaseException, name: str, what: str, instead: str
) -> None:
    """Log that a vmapped path failed and what runs instead; remember it in ``cache`` so later
    calls skip the attempt (not for closed-over tensors: they depend on the call's tensors)."""
    if cache is not None and not isinstance(err, ForeignUnderVmap):
        cache.checked.add(key)
    _log.info("%s: %s (%s); %s", name, what, (str(err).splitlines() or [""])[0][:200], instead)


def check_reaches_inner(problem: Problem, mp: MetaParams, inner_data: Any, batched: bool) -> None:
    """Raise, as the unrolled loop does, when an inner parameter does not reach the inner loss.

    ``torch.func.grad`` silently returns zeros for such parameters, so one first-order step of
    problem 0 with autograd decides it instead of the strategy.
    """
    if problem.allow_unused or problem.steps == 0:
        return
    probe = dataclasses.replace(problem, steps=1, order=1, outer_weights=None, check_finite=False)
    w0 = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in mp.w0.items()}
    di = index(inner_data, 0) if batched else inner_data
    with torch.enable_grad():
        run(probe, AutogradBackend(probe, 0, False), w0, mp.h, mp.opt, di, None)


FOREIGN = (
    "{name}: an objective (or the optimizer) closes over a tensor that requires grad, and "
    "strategy='vmap' cannot deliver its gradient. Pass it in h (the hyperparameters) so it is "
    "differentiated, or use strategy='unroll' (alias 'loop'), which finds closed-over tensors "
    "and gives them their exact gradient."
)


def _vmap_fn(
    problem: Problem,
    flat: Flat,
    need_grad: bool,
    check: bool,
    weighted: bool,
    compiled: bool = False,
) -> Callable[..., tuple[list[Tensor], Tensor, Tensor, Tensor | None]]:
    """``(diff, consts, inner, outer, weights) -> (grads, loss, per_problem, finite flags)``.

    ``finite`` is one flag for all outputs (``per_problem`` and every gradient): computed inside
    the (compiled) function, where it fuses, instead of many small ops after it.
    """
    backend = FuncBackend(create_graph=problem.order == 2 and need_grad)
    # Only the structure is captured (not the first call's tensors): the function is cached.
    n, spec, wrt = len(flat.leaves), flat.spec, list(flat.wrt)
    const_at = [i for i in range(n) if i not in set(wrt)]

    def one(mp: MetaParams, di: Any, do: Any, weights: Tensor | None) -> Tensor:
        if isinstance(di, list):  # a PerStep's batches travel through vmap as a list
            di = PerStep(di)
        obj, _, _ = run(problem, backend, mp.w0, mp.h, mp.opt, di, do, weights=weights)
        assert obj is not None
        return obj

    def fn(
        diff: list[Tensor], consts: list[Any], di: Any, do: Any, weights: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor, Tensor | None]:
        def tree(d: list[Tensor]) -> MetaParams:
            leaves: list[Any] = [None] * n
            for i, v in zip(const_at, consts):
                leaves[i] = v
            for i, v in zip(wrt, d):
                leaves[i] = v
            return MetaParams(*pytree.tree_unflatten(leaves, spec))

        def mean_loss(d: list[Tensor]) -> tuple[Tensor, Tensor]:
            mp = tree(d)
            if weighted:
                per = torch.func.vmap(lambda a, b: one(mp, a, b, weights), randomness="different")(
                    di, do
                )
            else:
                per = torch.func.vmap(lambda a, b: one(mp, a, b, None), randomness="different")(
                    di, do
                )
            return per.mean(), per.detach()

        def stepwise(d: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
            inner_data = PerStep(di) if isinstance(di, list) else di
            return _per_step(problem, tree(d), inner_data, do, weights)

        grads: list[Tensor] = []
        if need_grad and diff and compiled:
            grads, (loss, per) = torch.func.grad_and_value(mean_loss, has_aux=True)(diff)
        elif need_grad and diff:
            # Eager: step by step, each step one vmap of the inner objectives and one autograd
            # call on their sum (create_graph), then one backward of the mean outer objective,
            # as a hand-written vmap loop runs. A torch.func.grad level inside one vmap of the
            # whole loop costs 1.7x the plain per-task loop on a model whose activations
            # dominate (BENCHMARKS.md); an outer torch.func.grad level wraps every op again.
            # Closed-over tensors are found by walking the graph (cheap).
            d = [v.detach().requires_grad_() for v in diff]
            with torch.enable_grad():
                loss, per, fresh = stepwise(d)
            if foreign_leaves([loss], [*d, *fresh]):
                raise ForeignUnderVmap(FOREIGN.format(name=problem.name))
            grads = list(torch.autograd.grad(loss, d, allow_unused=True, materialize_grads=True))
            loss = loss.detach()
        else:
            loss, per = mean_loss(diff)
        if not check:
            return grads, loss, per, None
        # One isfinite over everything: a few ops instead of two per output (eager cost).
        finite = torch.cat([o.reshape(-1) for o in [per, *grads]]).isfinite().all()
        return grads, loss, per, finite

    return fn


def _per_step(
    problem: Problem, mp: MetaParams, inner_data: Any, outer_data: Any, weights: Tensor | None
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(mean outer objective, per-problem objectives, fresh leaves)`` of the inner loops of
    all problems, run step by step on parameters batched as ``[P, *shape]``, differentiable in
    ``mp``; the fresh leaves stand for inner weights that are not differentiated (they are no
    closed-over tensors).

    Same arithmetic as :func:`metagrad.bilevel._inner.run` under ``vmap`` (the update and the
    outer weights included); inner gradients by autograd on the summed vmapped losses (the
    problems share no weights, so the sum's gradient for problem ``p``'s copy is its own).
    """
    P = count_problems(problem.name, inner_data, outer_data)
    create_graph = problem.order == 2
    h = problem.hyper(mp.h)
    opt = resolved_optimizer(problem, mp.opt)
    w = {n: v.expand(P, *v.shape) for n, v in mp.w0.items()}
    # A weight that is not differentiated still needs an inner gradient (torch.func.grad gives
    # one to every weight): a fresh leaf of its batched copy.
    fresh = {n: v.detach().requires_grad_() for n, v in w.items() if v.is_floating_point()
             and not v.requires_grad}  # fmt: skip
    w = {n: fresh.get(n, v) for n, v in w.items()}
    state = torch.func.vmap(opt.init)(w)

    def inner_at(k: int) -> Callable[[Params, Any], Tensor]:
        return lambda x, b: problem.call_inner(x, h, b, k)

    def outer_at(k: int) -> Callable[[Params, Any], Tensor]:
        return lambda x, b: problem.call_outer(x, h, b, k)

    per: Tensor | None = None
    K = problem.steps
    for k in range(K):
        batch = batch_at(problem, inner_data, k)
        grads, _ = batched_grads(inner_at(k), w, batch, create_graph, "different")
        lrs = {m: problem.lr(h, k, m) for m in w} if problem.lr is not None else None
        w, state = batched_update(opt, grads, state, w, k, lrs)
        if problem.outer_weights is not None:
            c = problem.weight(k + 1) if weights is None else weights[k]
            q = vmap_flat(outer_at(k + 1), w, outer_data, "different")
            per = c * q if per is None else per + c * q
    if problem.outer_weights is None or K == 0:
        per = vmap_flat(outer_at(K), w, outer_data, "different")
    assert per is not None
    return per.mean(), per.detach(), list(fresh.values())


def vmapped(
    problem: Problem,
    flat: Flat,
    inner_data: Any,
    outer_data: Any,
    *,
    need_grad: bool,
    compile: bool | str | Callable[..., Any] = False,
    cache: Cache | None = None,
) -> tuple[HyperGrad, Tensor | None]:
    """All problems at once; returns the result and the finiteness flags (None if unchecked)."""
    check = problem.check_finite
    weighted = problem.outer_weights is not None and problem.steps > 0
    # The checks run on the vmapped outputs (finite flags), not per step inside vmap.
    fn_problem = dataclasses.replace(problem, check_finite=False) if check else problem
    if compile and need_grad:
        # The outer weights enter as a tensor input; the rest of the problem is the cache key.
        unchecked = dataclasses.replace(problem, check_finite=False, outer_weights=None)
        if cache is None:
            raise ValueError(
                f"{problem.name}: compile=True needs cache=metagrad.bilevel.Cache(), reused "
                f"across calls, so the compiled function is built once and not every call."
            )
        key = (unchecked, weighted, compile, repr(flat.spec), tuple(flat.wrt), check)
        fn = cache.compiled.get(key)
        if fn is None:
            backend = "inductor" if compile is True else compile
            fn = torch.compile(
                _vmap_fn(fn_problem, flat, need_grad, check, weighted, compiled=True),
                backend=backend,
            )
            cache.compiled[key] = fn
    else:
        fn = _vmap_fn(fn_problem, flat, need_grad, check, weighted)
    wrt = set(flat.wrt)
    diff = [flat.leaves[i].detach() for i in flat.wrt]
    consts = [
        x.detach() if isinstance(x, Tensor) else x
        for i, x in enumerate(flat.leaves)
        if i not in wrt
    ]
    di = list(inner_data.batches) if isinstance(inner_data, PerStep) else inner_data
    weights = None
    if weighted:
        assert problem.outer_weights is not None
        sample = diff[0] if diff else next(x for x in consts if isinstance(x, Tensor))
        weights = torch.tensor(problem.outer_weights, dtype=sample.dtype, device=sample.device)
    grads, loss, per, finite = fn(diff, consts, di, outer_data, weights)
    if need_grad and (loss.requires_grad or any(g.requires_grad for g in grads)):
        raise ForeignUnderVmap(FOREIGN.format(name=problem.name))
    res = HyperGrad(
        loss.detach(),
        per,
        flat.grads(dict(zip(flat.wrt, grads))) if need_grad else flat.grads({}),
        strategy="vmap",
    )
    return res, finite
