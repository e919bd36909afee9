r"""One entry point for every strategy: :func:`hypergrad`.

======================  ===============================================  =========================
strategy                how                                              memory
======================  ===============================================  =========================
``"unroll"`` (``loop``) ``create_graph`` through the inner loop,         one problem's unrolled
                        one problem at a time                            graph (grows with K)
``"vmap"``              ``grad(mean(vmap(problem)))`` over problems      all problems' graphs
``"adjoint"``           backward chain of VJPs at stored iterates        one step's graph + K
(``hvp_chain``)                                                          parameter copies
``"checkpoint"``        as adjoint, every ``ceil(sqrt K)``-th iterate    one step + O(sqrt K)
``"truncated"``         unrolled over the last ``truncate`` steps        ``truncate`` steps (biased)
``"forward"``           ``jvp`` per scalar hyperparameter                flat in K and model size
``"implicit"``          implicit function theorem at the inner solution  one step (needs a solved
                                                                         inner problem)
======================  ===============================================  =========================

All but ``truncated`` and ``implicit`` are exact and agree to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from metagrad._compat import pytree
from metagrad._errors import Locate, NonFiniteError, translate_autograd_error
from metagrad._typing import Params
from metagrad.bilevel._adjoint import adjoint
from metagrad.bilevel._adjoint_vmap import adjoint_vmapped, group_size
from metagrad.bilevel._forward import forward_mode
from metagrad.bilevel._implicit_strategy import ImplicitOptions, implicit
from metagrad.bilevel._inner import batch_at
from metagrad.bilevel._problem import HyperGrad, MetaParams, Problem
from metagrad.bilevel._tree import Flat, all_finite, count_problems, index, unwrap_per_step
from metagrad.bilevel._unroll import unroll
from metagrad.bilevel._vmap import (
    Cache,
    ForeignUnderVmap,
    check_reaches_inner,
    note_vmap_failure,
    signature,
    vmapped,
)
from metagrad.functional._locate import NodeRecord, probe_records

_ALIASES = {"loop": "unroll", "hvp_chain": "adjoint"}  # the MAML family's names
# The one list of engine strategies; the MAML family's list (algorithms._task) maps onto it.
STRATEGIES = (
    "auto",
    "unroll",
    "vmap",
    "adjoint",
    "checkpoint",
    "truncated",
    "forward",
    "implicit",
    *_ALIASES,
)


def resolve(strategy: str, problem: Problem, *, batched: bool, vmap_ok: bool) -> str:
    """The concrete strategy: aliases resolved; ``auto`` = vmap for batched vmap-safe problems."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"{problem.name}: strategy={strategy!r} is not known; use one of {STRATEGIES} "
            f"('auto' picks vmap where it is exact and fast, else the unrolled loop)."
        )
    if strategy == "auto":
        return "vmap" if batched and vmap_ok else "unroll"
    return _ALIASES.get(strategy, strategy)


def hypergrad(
    problem: Problem,
    w0: Params,
    h: Any = None,
    inner_data: Any = None,
    outer_data: Any = None,
    *,
    strategy: str = "auto",
    batched: bool = False,
    need_grad: bool = True,
    truncate: int | None = None,
    implicit_options: ImplicitOptions | None = None,
    compile: bool | str | Callable[..., Any] = False,
    cache: Cache | None = None,
    vmap_ok: bool = False,
) -> HyperGrad:
    r"""The outer objective after the inner loop and its exact gradient in ``w0``, ``h`` and the
    optimizer's tensor hyperparameters.

    .. math::
        G(w_0, h) = \frac1P\sum_i \sum_k c_k\, g(w^{(i)}_k, h, b^{out}_i),\qquad
        \text{returns } G,\ \frac{\partial G}{\partial w_0},\ \frac{\partial G}{\partial h},\
        \frac{\partial G}{\partial \eta}

    Args:
        problem: the :class:`Problem` (objectives, optimizer, steps, order).
        w0: initial inner parameters, name -> tensor. Entries that require grad get a gradient
            (MAML's meta-learned initialization); the others are a fixed starting point.
        h: hyperparameters, any pytree of tensors read by the objectives (and ``problem.lr``);
            leaves that require grad are differentiated, the others are constants.
        inner_data: the inner batch (used at every step) or :class:`PerStep` batches.
        outer_data: the batch of the outer objective.
        strategy: see the module table. ``"auto"``: ``"vmap"`` when ``batched`` and
            ``vmap_ok``, else ``"unroll"``.
        batched: the data holds ``P`` independent problems along the first dimension of every
            tensor (sharing ``w0`` and ``h``); the result is the mean over problems.
        need_grad: False computes the value only.
        truncate: steps kept by ``strategy="truncated"``.
        implicit_options: linear-solve settings of ``strategy="implicit"``.
        compile: ``torch.compile`` the vmapped function (``strategy="vmap"``; True = inductor
            or a backend name); needs ``cache``.
        cache: a :class:`Cache` reused across calls (compiled functions, one-time checks).
        vmap_ok: the objectives are safe to ``vmap`` over problems (lets ``auto`` pick it).

    Returns:
        :class:`HyperGrad`: ``value``, ``per_problem``, ``grads`` (a :class:`MetaParams` shaped
        like ``(w0, h, optimizer hyperparameters)``), ``foreign`` (closed-over tensors and their
        gradients), ``w`` (final inner parameters of an unbatched problem).

    Raises:
        ValueError: bad inputs, unused hyperparameters, an inexact strategy request.
        NonFiniteError: NaN/Inf, naming the problem index, the inner step and the tensor.

    Example:
        >>> import torch
        >>> from metagrad import bilevel, optim
        >>> X, y = torch.randn(20, 3), torch.randn(20)
        >>> def inner(w, h, b):
        ...     return ((b[0] @ w["w"] - b[1]) ** 2).mean() + h["lam"] * (w["w"] ** 2).sum()
        >>> def outer(w, h, b):
        ...     return ((b[0] @ w["w"] - b[1]) ** 2).mean()
        >>> pb = bilevel.Problem(inner, outer, optim.SGD(lr=0.1), steps=10)
        >>> lam = torch.tensor(0.1, requires_grad=True)
        >>> res = bilevel.hypergrad(pb, {"w": torch.zeros(3)}, {"lam": lam}, (X, y), (X, y))
        >>> res.grads.h["lam"].shape
        torch.Size([])
    """
    fn = problem.name
    mp = MetaParams(_check_w0(fn, w0), _check_h(fn, h), problem.optimizer.hyperparams())
    chosen = resolve(strategy, problem, batched=batched, vmap_ok=vmap_ok)
    if chosen == "truncated":
        if isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 1:
            raise ValueError(
                f"{fn}: strategy='truncated' needs truncate=k, the number of final inner steps "
                f"to differentiate (an int >= 1); got truncate={truncate!r}."
            )
    elif truncate is not None:
        raise ValueError(
            f"{fn}: truncate={truncate!r} applies to strategy='truncated' only (got "
            f"strategy={strategy!r})."
        )
    if compile and chosen != "vmap":
        raise ValueError(
            f"{fn}: compile=True needs strategy='vmap' over batched problems (the chosen "
            f"strategy is {chosen!r}); use compile=False."
        )
    flat = Flat(mp, need_grad)
    sig = signature(problem)
    if chosen == "vmap" and strategy == "auto" and cache is not None:
        if ("no-vmap", sig) in cache.checked:
            chosen = "unroll"  # an earlier call found this problem cannot be vmapped
    args = (flat, mp, inner_data, outer_data, batched, need_grad)
    batch_adjoint = (
        chosen in ("adjoint", "checkpoint")
        and vmap_ok
        and batched
        and need_grad
        # one problem: vmap would add its fixed cost to the same work
        and count_problems(fn, inner_data, outer_data) > 1
        and (cache is None or ("no-vmap-adjoint", sig) not in cache.checked)
    )
    group = 1
    if batch_adjoint:
        every = _checkpoint_every(problem) if chosen == "checkpoint" else None
        gkey = ("adjoint-group", sig, every, _shapes(inner_data))
        known = cache.sizes.get(gkey) if cache is not None else None
        group = known if known is not None else group_size(problem, flat, inner_data, every)
        if cache is not None:
            cache.sizes[gkey] = group
        batch_adjoint = group >= 2  # not even two problems fit: one at a time
    with _explain_autograd_errors(problem, chosen, _locator(problem, mp, inner_data, batched)):
        try:
            if chosen == "vmap" or batch_adjoint:  # torch.func gives unused parameters zeros
                key = ("reach", sig)
                if cache is None or key not in cache.checked:
                    check_reaches_inner(problem, mp, inner_data, batched)
                    if cache is not None:
                        cache.checked.add(key)
            res = _checked(
                problem, chosen, *args, truncate, implicit_options or ImplicitOptions(),
                compile, cache, group if batch_adjoint else 0,
            )  # fmt: skip
        except (ForeignUnderVmap, RuntimeError) as err:
            if strategy != "auto" or chosen != "vmap":
                raise
            # The unrolled loop handles what vmap cannot: closed-over tensors (it finds and
            # differentiates them), .item() and data-dependent control flow, numpy calls. Its
            # own error, if any, is the one to report.
            note_vmap_failure(
                cache, ("no-vmap", sig), err, fn, "vmap failed", "using the unrolled loop"
            )
            res = _checked(problem, "unroll", *args, None, ImplicitOptions(), False, cache, 0)
    if need_grad:
        unused = _unused_hyper(problem, flat, res, mp, inner_data, outer_data, batched)
        if unused and not problem.allow_unused_hyper:
            names = flat.names()
            raise ValueError(
                f"{problem.name}: hyperparameters {[names[j] for j in unused]} require grad but "
                f"do not reach the {problem.outer_name} (neither directly nor through the inner "
                f"loop), so they have no gradient. Remove them, set requires_grad=False, or pass "
                f"allow_unused_hyper=True to the Problem to get None for them."
            )
        if unused:  # the torch.func strategies' zeros: None, as the autograd strategies give
            g = pytree.tree_leaves(tuple(res.grads))
            res.grads = flat.grads({j: v for j, v in enumerate(g) if j not in set(unused)})
    return res


def _checkpoint_every(problem: Problem) -> int:
    """The checkpoint strategy's stride ``m = ceil(sqrt K)``: every ``m``-th iterate is kept and
    one segment of ``m`` is rebuilt at a time, at most ``K // m + 1 + m`` copies (~2 sqrt K).

    Where that bound is no smaller than ``K`` (``K <= 6``) segments save nothing, so every
    iterate is kept (stride 1): the same memory bound without the recompute (at 5 steps the
    recompute cost ~15% of the batched sinusoid meta-step; BENCHMARKS.md).
    """
    K = problem.steps
    m = max(1, math.ceil(math.sqrt(K)))
    return 1 if K // m + 1 + m >= K else m


def _shapes(data: Any) -> tuple[Any, ...]:
    """Shapes and dtypes of the data's tensors (what a measured memory size depends on)."""
    leaves = pytree.tree_leaves(unwrap_per_step(data))
    return tuple((tuple(x.shape), x.dtype) for x in leaves if isinstance(x, Tensor))


def _checked(
    problem: Problem,
    chosen: str,
    flat: Flat,
    mp: MetaParams,
    inner_data: Any,
    outer_data: Any,
    batched: bool,
    need_grad: bool,
    truncate: int | None,
    options: ImplicitOptions,
    compile: bool | str | Callable[..., Any],
    cache: Cache | None,
    adjoint_group: int,
) -> HyperGrad:
    """Run unchecked; on a non-finite result re-run with per-step checks to name the culprit.

    ``adjoint_group``: the adjoint strategies vmap over groups of that many problems (0: one
    problem at a time); the unchecked pass only: the checked re-run goes problem by problem, so
    it can name the problem and step.

    Checking every inner gradient costs a device sync per tensor per step (~12% of a small
    model's meta-step); NaN/Inf propagate to the result, so one test of the result suffices.
    """

    def go(pb: Problem) -> tuple[HyperGrad, Tensor | None]:
        if chosen == "vmap":  # checks inside the vmapped function, where they fuse
            return vmapped(
                problem,
                flat,
                inner_data,
                outer_data,
                need_grad=need_grad,
                compile=compile,
                cache=cache,
            )
        if chosen in ("unroll", "truncated"):
            out = unroll(
                pb,
                mp,
                inner_data,
                outer_data,
                batched=batched,
                need_grad=need_grad,
                truncate=truncate,
            )
        elif not need_grad:  # value only: every reverse strategy's forward pass is the same
            out = unroll(pb, mp, inner_data, outer_data, batched=batched, need_grad=False)
        elif chosen in ("adjoint", "checkpoint"):
            every = _checkpoint_every(pb) if chosen == "checkpoint" else None
            if adjoint_group and not pb.check_finite:
                try:
                    return adjoint_vmapped(
                        pb,
                        flat,
                        inner_data,
                        outer_data,
                        every=every,
                        check=problem.check_finite,
                        group=adjoint_group,
                    )
                except (ForeignUnderVmap, RuntimeError) as err:
                    # what vmap cannot run (closed-over tensors, .item(), data-dependent
                    # control flow) the per-problem chain can; its own error is the one to see
                    note_vmap_failure(
                        cache,
                        ("no-vmap-adjoint", signature(problem)),
                        err,
                        problem.name,
                        "batched adjoint failed",
                        "one problem at a time",
                    )
            out = adjoint(pb, flat, inner_data, outer_data, batched=batched, every=every)
        elif chosen == "forward":
            out = forward_mode(pb, flat, inner_data, outer_data, batched=batched, cache=cache)
        else:
            out = implicit(pb, flat, inner_data, outer_data, batched=batched, options=options)
        return out, None

    if not problem.check_finite:
        return go(problem)[0]
    res, flags = go(
        problem if chosen == "vmap" else dataclasses.replace(problem, check_finite=False)
    )
    finite = bool(flags.all()) if flags is not None else _result_finite(res)
    if finite:
        return res
    if chosen in ("vmap", "forward"):  # no branching on data there: the loop names the place
        unroll(problem, mp, inner_data, outer_data, batched=batched, need_grad=need_grad)
    else:
        go(problem)
    raise NonFiniteError(problem.name, _grad_word(problem), None, None, problem.unit)


def _grad_word(problem: Problem) -> str:
    return "meta-gradient" if problem.unit == "task" else "hypergradient"


def _result_finite(res: HyperGrad) -> bool:
    grads = [g for g in pytree.tree_leaves(tuple(res.grads)) if isinstance(g, Tensor)]
    return all_finite([res.per_problem, *grads, *(g for _, g in res.foreign)])


@contextmanager
def _explain_autograd_errors(
    problem: Problem, strategy: str | None = None, locate: Locate | None = None
) -> Iterator[None]:
    """Re-raise PyTorch's cryptic double-backward failures with an explanation and the fix."""
    try:
        yield
    except RuntimeError as err:
        better = translate_autograd_error(
            problem.name, err, problem.order, strategy=strategy, locate=locate
        )
        if better is None:
            raise
        raise better from err


def _locator(problem: Problem, mp: MetaParams, inner_data: Any, batched: bool) -> Locate:
    """Re-runs the first inner forward pass recording which module creates which node."""

    def locate() -> list[NodeRecord]:
        di = index(inner_data, 0) if batched else inner_data
        w = {n: v.detach().requires_grad_(v.is_floating_point()) for n, v in mp.w0.items()}
        return probe_records(
            lambda: problem.call_inner(w, problem.hyper(mp.h), batch_at(problem, di, 0), 0)
        )

    return locate


def _unused_hyper(
    problem: Problem,
    flat: Flat,
    res: HyperGrad,
    mp: MetaParams,
    inner_data: Any,
    outer_data: Any,
    batched: bool,
) -> list[int]:
    """Leaf indices of hyperparameters that require grad but do not reach the outer objective."""
    hyper = [j for j in flat.wrt if j >= flat.n_w0]
    if not hyper:
        return []
    g_leaves = pytree.tree_leaves(tuple(res.grads))
    if res.strategy in ("vmap", "forward", "adjoint", "checkpoint"):
        # torch.func (vmap, forward, the batched adjoint) returns zeros for an unused input:
        # only an all-zero gradient needs the autograd probe (problem 0, unrolled) that can
        # tell "unused" from "zero".
        zero = [j for j in hyper if g_leaves[j] is not None and not bool(g_leaves[j].any())]
        if not zero:
            return [j for j in hyper if g_leaves[j] is None]
        di = index(inner_data, slice(0, 1)) if batched else inner_data
        do = index(outer_data, slice(0, 1)) if batched else outer_data
        lenient = dataclasses.replace(problem, allow_unused_hyper=True)
        probe = unroll(lenient, mp, di, do, batched=batched, find_foreign=False)
        probed = pytree.tree_leaves(tuple(probe.grads))
        return [j for j in hyper if g_leaves[j] is None or (j in zero and probed[j] is None)]
    return [j for j in hyper if g_leaves[j] is None]


def _check_w0(fn: str, w0: object) -> Params:
    if not isinstance(w0, dict) or not w0:
        raise TypeError(
            f"{fn}: w0 must be a non-empty dict name -> tensor of the inner parameters (e.g. "
            f"dict(model.named_parameters())), got {type(w0).__name__}."
        )
    bad = [k for k, v in w0.items() if not isinstance(v, Tensor) or not v.is_floating_point()]
    if bad:
        raise TypeError(
            f"{fn}: w0 entries {bad} are not floating-point tensors; inner parameters are "
            f"trained by gradient steps, so pass float tensors."
        )
    return dict(w0)


def _check_h(fn: str, h: Any) -> Any:
    bad = [
        type(x).__name__
        for x in pytree.tree_leaves(h)
        if x is not None and not isinstance(x, (Tensor, int, float, bool, str))
    ]
    if bad:
        raise TypeError(
            f"{fn}: h must be a pytree (dict, list, tuple, NamedTuple) of tensors; it holds "
            f"{sorted(set(bad))}. Put model objects in the objectives' closure instead."
        )
    return h
