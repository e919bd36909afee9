r"""Reverse mode without the inner loop's graph: a backward chain of vector-Jacobian products.

For an inner loop :math:`(w_{k+1}, s_{k+1}) = F_k(w_k, s_k; \phi)` (parameters :math:`w`,
optimizer state :math:`s`, hyperparameters :math:`\phi`) and objective
:math:`\sum_k c_k\, g(w_k; \phi)`, reverse mode runs backwards over the steps with adjoints
:math:`(v_k, u_k)`:

.. math::
    v_K = c_K \nabla_w g(w_K),\qquad
    (v_k, u_k, \bar\phi) \mathrel{+}=
      \Bigl(\frac{\partial F_k}{\partial (w_k, s_k, \phi)}\Bigr)^{\!\top} (v_{k+1}, u_{k+1})
      + c_k \nabla g(w_k),\qquad \frac{dG}{dw_0} = v_0 .

For SGD :math:`F_k(w) = w - a_k \nabla f(w)`, so a step is :math:`v_k = (I - a_k H_k) v_{k+1}`,
one Hessian-vector product at the stored iterate :math:`w_k`, and
:math:`\partial G/\partial a_k = -v_{k+1}\cdot\nabla f(w_k)`.

Only the iterates :math:`(w_k, s_k)` are stored, never the activations of the unrolled loop:
each step's graph is rebuilt from :math:`w_k`, used for one VJP and freed. ``every=m`` keeps only
every ``m``-th iterate and recomputes each segment when the backward pass reaches it
(``strategy="checkpoint"``, :math:`m = \lceil\sqrt K\rceil`: :math:`O(\sqrt K)` copies for one
more forward pass of the inner loop). Both equal the unrolled loop to rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad._errors import check_finite
from metagrad._typing import Params
from metagrad.bilevel._foreign import foreign_leaves
from metagrad.bilevel._inner import AutogradBackend, batch_at, inner_step, resolved_optimizer
from metagrad.bilevel._problem import HyperGrad, Problem
from metagrad.bilevel._tree import (
    Flat,
    GradSum,
    accumulate,
    count_problems,
    fresh_leaf,
    index,
    is_plain,
    tree_detach,
)


def adjoint(
    problem: Problem,
    flat: Flat,
    inner_data: Any,
    outer_data: Any,
    *,
    batched: bool,
    every: int | None = None,
) -> HyperGrad:
    """Mean outer objective and its exact gradient by the backward VJP chain, per problem."""
    P = count_problems(problem.name, inner_data, outer_data) if batched else 1
    totals: dict[int, Tensor | None] = GradSum()
    losses = []
    foreign: list[Tensor] | None = None
    foreign_tot: list[Tensor | None] = []
    for i in range(P):
        di = index(inner_data, i) if batched else inner_data
        do = index(outer_data, i) if batched else outer_data
        obj, gs, fgs, found = _one_problem(
            problem, flat, di, do, i if batched else None, every, foreign
        )
        if foreign is None:
            foreign, foreign_tot = found, [None] * len(found)
        losses.append(obj)
        for j, g in gs.items():
            accumulate(totals, j, g)
        for j, g in enumerate(fgs):
            if g is not None:
                prev = foreign_tot[j]
                foreign_tot[j] = g if prev is None else prev + g
    if P > 1:  # the mean over problems: one division of each sum
        totals = {j: None if g is None else g / P for j, g in totals.items()}
        foreign_tot = [None if g is None else g / P for g in foreign_tot]
    per = torch.stack(losses)
    pairs = [(t, g) for t, g in zip(foreign or [], foreign_tot) if g is not None]
    name = "adjoint" if every is None else "checkpoint"
    return HyperGrad(per.mean(), per, flat.grads(totals), pairs, strategy=name)


class Iterates:
    """The forward sweep's iterates ``(w_0, s_0) .. (w_n, s_n)``: every ``every``-th kept, the
    rest recomputed when asked for.

    ``advance(w, s, k)`` gives step ``k``'s result (``recompute``, default ``advance``, when a
    segment is rebuilt). ``every=None`` keeps all of them (adjoint); otherwise one segment of
    ``every`` recomputed iterates is held at a time (checkpoint: O(n / every + every) copies).
    Iterates live in blocks allocated once (one per leaf, all slots): stored copies made step by
    step would sit between the transient activations on the heap and pin it, which grew the
    peak by about an activation per step on wide models (glibc's dynamic mmap threshold).
    """

    def __init__(
        self,
        advance: Callable[[Params, Any, int], tuple[Params, Any]],
        start: tuple[Params, Any],
        n: int,
        every: int | None,
        recompute: Callable[[Params, Any, int], tuple[Params, Any]] | None = None,
    ) -> None:
        self.recompute = advance if recompute is None else recompute
        self.n = n
        self.stride = stride = 1 if every is None else max(1, every)
        self.slot = {k: i for i, k in enumerate([*range(0, n, stride), n])}
        self.start = start  # n == 0 (one inner step's top step): no copy to keep
        self.kept = _Bank(start, len(self.slot)) if n > 0 else None
        state = start
        for k in range(n):
            if k in self.slot:
                assert self.kept is not None
                self.kept.put(self.slot[k], state)
            state = advance(*state, k)
        if self.kept is not None:
            self.kept.put(self.slot[n], state)
        self.last = state  # (w_n, s_n)
        self.segment = _Bank(start, stride) if stride > 1 else None
        self.in_segment: list[int] = []  # the steps the segment bank holds, in slot order

    def get(self, k: int) -> tuple[Params, Any]:
        if self.kept is None:
            return self.start
        if k in self.slot:
            return self.kept.get(self.slot[k])
        assert self.segment is not None
        if k not in self.in_segment:  # recompute the segment that holds step k
            self.in_segment.clear()
            base = (k // self.stride) * self.stride
            state = self.kept.get(self.slot[base])
            for j in range(base + 1, min(base + self.stride, self.n)):
                state = self.recompute(*state, j - 1)
                self.segment.put(len(self.in_segment), state)
                self.in_segment.append(j)
        return self.segment.get(self.in_segment.index(k))


def _detached_step(
    problem: Problem, optimizer: Any, backend: AutogradBackend, h: Any, inner_data: Any
) -> Callable[[Params, Any, int], tuple[Params, Any]]:
    """``(w_k, s_k, k) -> (w_{k+1}, s_{k+1})`` without a graph (a forward-sweep step)."""

    def step(w: Params, s: Any, k: int) -> tuple[Params, Any]:
        with torch.enable_grad():
            a = {n: v.detach().requires_grad_() for n, v in w.items()}
            new, new_s, _ = inner_step(
                problem, optimizer, backend, a, h, s, k, batch_at(problem, inner_data, k)
            )
        return {n: v.detach() for n, v in new.items()}, tree_detach(new_s)

    return step


def _one_problem(
    problem: Problem,
    flat: Flat,
    inner_data: Any,
    outer_data: Any,
    at: int | None,
    every: int | None,
    known_foreign: list[Tensor] | None,
) -> tuple[Tensor, dict[int, Tensor | None], list[Tensor | None], list[Tensor]]:
    K = problem.steps
    n0 = flat.n_w0
    # phi: leaf copies of the hyperparameters (and optimizer hyperparameters); w0 detached.
    leaves = [x.detach() if isinstance(x, Tensor) else x for x in flat.leaves[:n0]]
    leaves += [fresh_leaf(x) for x in flat.leaves[n0:]]
    mp = flat.rebuild(leaves, at=list(range(len(leaves))))
    phi_idx = [j for j in flat.wrt if j >= n0]
    phi = [leaves[j] for j in phi_idx]
    w0_names = list(mp.w0)
    w0_idx = {n: j for j, n in enumerate(w0_names) if j in set(flat.wrt)}
    h, opt_h = mp.h, mp.opt
    optimizer = resolved_optimizer(problem, opt_h)
    grads: dict[int, Tensor | None] = GradSum()
    foreign = [] if known_foreign is None else list(known_foreign)
    foreign_g: list[Tensor | None] = [None] * len(foreign)
    search = known_foreign is None  # look for closed-over leaves in the first graphs only

    with torch.no_grad():  # the forward sweep keeps no graph: prepare(h) once, as a constant
        h_fwd = problem.hyper(h)
    unchecked = dataclasses.replace(problem, check_finite=False)
    start = {n: v.detach() for n, v in mp.w0.items()}
    # With c_K != 0 the sweep stops at w_{K-1}: the top reverse step's rebuilt graph yields
    # w_K as its primal and takes the outer gradient with it (one step and one outer forward
    # fewer than sweeping to w_K; at K=1 the work of the unrolled loop).
    c_top = problem.weight(K) if K > 0 else 0.0
    top = c_top != 0.0
    iterates = Iterates(
        _detached_step(problem, optimizer, AutogradBackend(problem, at, False), h_fwd, inner_data),
        (start, optimizer.init(start)),
        K - 1 if top else K,
        every,
        # a segment rebuilt in the backward pass was checked when the sweep first computed it
        recompute=_detached_step(
            unchecked, optimizer, AutogradBackend(unchecked, at, False), h_fwd, inner_data
        ),
    )
    iterate = iterates.get
    w, state = iterates.last

    def add_phi(gs: tuple[Tensor | None, ...]) -> None:
        for j, g in zip(phi_idx, gs[: len(phi)]):
            accumulate(grads, j, g)
        for j, g in enumerate(gs[len(phi) :]):
            if g is not None:
                prev = foreign_g[j]
                foreign_g[j] = g if prev is None else prev + g

    def discover(roots: list[Tensor], known: list[Any]) -> None:
        nonlocal foreign_g
        if not search:
            return
        new = foreign_leaves(roots, [*flat.leaves, *leaves, *known, *foreign])
        foreign.extend(new)
        foreign_g = foreign_g + [None] * len(new)

    sample = next(iter(w.values()), None)
    objective = torch.zeros((), dtype=sample.dtype if sample is not None else torch.float32)
    v: Params = {} if top else {n: torch.zeros_like(x) for n, x in w.items()}
    u_leaves = (
        []
        if top
        else [torch.zeros_like(x) for x in pytree.tree_leaves(state) if isinstance(x, Tensor)]
    )
    back = AutogradBackend(problem, at, create_graph=problem.order == 2)

    def pull(j: int, v: Params | None, u_leaves: list[Tensor]) -> tuple[Params, list[Tensor]]:
        """Backward through step ``j``: rebuild its graph from the stored iterate, one VJP of
        ``(w_{j+1}, s_{j+1})`` with ``(v, u)`` (``v=None``: the top step, whose cotangent is
        ``c_K g(w_K)`` instead), free it. Returns ``(v_j, u_j)``; phi's share is added."""
        nonlocal objective
        w_prev, s_prev = iterate(j)
        with torch.enable_grad():
            a = {n: x.detach().requires_grad_() for n, x in w_prev.items()}
            s_flat, s_spec = pytree.tree_flatten(s_prev)
            s_in = [x.detach().requires_grad_() if isinstance(x, Tensor) else x for x in s_flat]
            s = pytree.tree_unflatten(s_in, s_spec)
            # prepare(h) inside each step's graph, so its VJP reaches the raw h
            hk = problem.hyper(h)
            new, new_s, _ = inner_step(
                problem, optimizer, back, a, hk, s, j, batch_at(problem, inner_data, j)
            )
            outs: list[tuple[Tensor, Tensor | None]]
            if v is None:
                q = problem.call_outer(new, hk, outer_data, j + 1)
                if problem.check_finite:
                    check_finite(problem.name, q, problem.outer_name, at, None, problem.unit)
                objective = objective + c_top * q.detach()
                outs = [(c_top * q, None)]
            else:
                new_s_leaves = [x for x in pytree.tree_leaves(new_s) if isinstance(x, Tensor)]
                outs = [(new[n], v[n]) for n in new]
                outs += list(zip(new_s_leaves, u_leaves))
            outs = [(o, cot) for o, cot in outs if o.requires_grad]
            s_tensors = [x for x in s_in if isinstance(x, Tensor)]
            discover([o for o, _ in outs], [*a.values(), *s_tensors])
            inputs = [*a.values(), *s_tensors, *phi, *foreign]
            gs = (
                torch.autograd.grad(
                    [o for o, _ in outs], inputs, [cot for _, cot in outs], allow_unused=True
                )
                if outs
                else (None,) * len(inputs)
            )
        na, ns = len(a), len(s_tensors)
        v_j = {n: (torch.zeros_like(a[n]) if g is None else g) for n, g in zip(a, gs[:na])}
        u_j = [torch.zeros_like(x) if g is None else g for x, g in zip(s_tensors, gs[na : na + ns])]
        add_phi(gs[na + ns :])
        return v_j, u_j

    if top:
        v, u_leaves = pull(K - 1, None, u_leaves)
    for k in range(K - 1 if top else K, -1, -1):
        w_k = iterate(k)[0]
        c = problem.weight(k)
        if c != 0.0:
            with torch.enable_grad():
                a = {n: x.detach().requires_grad_() for n, x in w_k.items()}
                q = problem.call_outer(a, problem.hyper(h), outer_data, k)
                if problem.check_finite:
                    check_finite(problem.name, q, problem.outer_name, at, None, problem.unit)
                discover([q], list(a.values()))
                gs = (
                    torch.autograd.grad(c * q, [*a.values(), *phi, *foreign], allow_unused=True)
                    if q.requires_grad
                    else (None,) * (len(a) + len(phi) + len(foreign))
                )
            objective = objective + c * q.detach()
            for n, g in zip(a, gs[: len(a)]):
                if g is not None:
                    v[n] = v[n] + g
            add_phi(gs[len(a) :])
        if k == 0:
            break
        v, u_leaves = pull(k - 1, v, u_leaves)
    for n, j in w0_idx.items():
        accumulate(grads, j, v[n])
    return objective, grads, foreign_g, foreign


class _Bank:
    """Storage for ``slots`` iterates ``(w, state)``: one preallocated block per tensor leaf."""

    def __init__(self, like: tuple[Params, Any], slots: int) -> None:
        w, state = like
        # Parameters as a flat dict and a state without tensors (SGD without momentum): every
        # put/get skips the pytree walk (it cost ~2% of a small MLP's meta-step).
        self.names = list(w) if is_plain(w) and not pytree.tree_leaves(state) else None
        self.state = state
        leaves, self.spec = pytree.tree_flatten(like)
        self.blocks = [
            torch.empty((slots, *x.shape), dtype=x.dtype, device=x.device)
            if isinstance(x, Tensor)
            else None
            for x in leaves
        ]
        self.consts: list[Any] = [None if isinstance(x, Tensor) else x for x in leaves]

    def put(self, i: int, value: tuple[Params, Any]) -> None:
        w, state = value
        if self.names is not None and list(w) == self.names and state == self.state:
            for block, x in zip(self.blocks, w.values()):
                assert block is not None
                block[i].copy_(x)
            return
        leaves, spec = pytree.tree_flatten(value)
        if spec != self.spec:
            raise RuntimeError(
                "metagrad.bilevel: the optimizer state changed structure between inner steps; "
                "the adjoint strategies need a fixed state layout (use strategy='unroll')."
            )
        for j, (block, x) in enumerate(zip(self.blocks, leaves)):
            if block is not None:
                block[i].copy_(x)
            else:
                self.consts[j] = x

    def get(self, i: int) -> tuple[Params, Any]:
        if self.names is not None:
            return {n: b[i] for n, b in zip(self.names, self.blocks) if b is not None}, self.state
        leaves = [c if b is None else b[i] for b, c in zip(self.blocks, self.consts)]
        out: tuple[Params, Any] = pytree.tree_unflatten(leaves, self.spec)
        return out
