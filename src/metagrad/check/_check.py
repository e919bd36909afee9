r"""``metagrad check``: is this meta-gradient really what it claims to be?

For a learner and a meta-batch, in float64 on a private copy:

1. **Finite differences.** For random unit directions :math:`d` over every meta-parameter,
   compare :math:`g^\top d` with :math:`(\mathcal{L}(\theta + h d) - \mathcal{L}(\theta - h d)) / 2h`
   (best of :math:`h, h/10, h/100`, so one ReLU kink crossed by a step does not fail the check).
2. **Unrolled reference.** An independent per-task loop written with
   ``torch.autograd.grad(create_graph=True)`` (SGD inner loops, incl. learned rates, ANIL
   subsets, multi-step loss and per-step norm weights).
3. **First vs second order.** How far the first-order approximation is from the exact
   gradient (relative distance and cosine): the part FOMAML drops.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import Tensor
from torch.func import functional_call

from metagrad import optim
from metagrad._tree import tree_flatten_vector, tree_unflatten_vector
from metagrad._typing import Params
from metagrad.algorithms._maml import MAML
from metagrad.algorithms._task import meta_gradient, resolve_strategy
from metagrad.functional._attention import attention_for


@dataclass(frozen=True)
class CheckReport:
    """Agreement of one learner's meta-gradient with three independent references.

    Attributes:
        fd_rel_error: max over directions of ``|g.d - FD| / max(|FD|, |g.d|, tiny)`` for the
            exact (second-order) meta-gradient ``g``.
        reference_rel_error: ``||g - g_ref|| / ||g_ref||`` for the learner's own order, or None
            when no reference applies.
        first_order_rel_distance: ``||g_1 - g_2|| / ||g_2||``.
        first_order_cosine: cosine between first- and second-order meta-gradients.
        directions: number of FD directions; step: FD step ``h``.
        num_meta_params: scalar meta-parameters checked.
        passed: FD error <= ``fd_tol`` and reference error <= ``ref_tol``.
    """

    algorithm: str
    order: int
    inner_steps: int
    strategy: str
    fd_rel_error: float
    reference_rel_error: float | None
    first_order_rel_distance: float
    first_order_cosine: float
    directions: int
    step: float
    num_meta_params: int
    fd_tol: float
    ref_tol: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        ref = "n/a" if self.reference_rel_error is None else f"{self.reference_rel_error:.2e}"
        verdict = "PASS" if self.passed else "FAIL"
        lines = [
            f"metagrad check: {self.algorithm} (order={self.order}, inner_steps={self.inner_steps}, "
            f"strategy={self.strategy}), {self.num_meta_params} meta-parameters, float64",
            f"  finite differences, exact gradient ({self.directions} directions, h={self.step:g}): "
            f"max rel. error {self.fd_rel_error:.2e}  (tol {self.fd_tol:g})",
            f"  unrolled reference, order {self.order}:  rel. error {ref}  (tol {self.ref_tol:g})",
            f"  first-order vs second-order: rel. distance {self.first_order_rel_distance:.3e}, "
            f"cosine {self.first_order_cosine:.6f}",
            f"  verdict: {verdict}" + (f"  ({self.note})" if self.note else ""),
        ]
        return "\n".join(lines)


def _flat(grads: Mapping[str, Tensor | None], like: dict[str, Tensor]) -> Tensor:
    """One vector in the order of ``like``; a missing or None gradient is zero."""
    filled = {k: torch.zeros_like(v) if grads.get(k) is None else grads[k] for k, v in like.items()}
    return tree_flatten_vector(cast(dict[str, Tensor], filled))


def reference_meta_gradient(
    learner: MAML, tasks: tuple[Tensor, Tensor, Tensor, Tensor], order: int
) -> dict[str, Tensor] | None:
    """Independent unrolled loop with ``torch.autograd.grad``; None for non-SGD inner loops.

    Keyed like ``learner.named_parameters()``.
    """
    opt = learner.inner_optimizer
    if not isinstance(opt, optim.SGD) or opt.groups or opt.maximize:
        return None
    if opt.momentum != 0 or opt.weight_decay != 0:
        return None
    fm = learner.fmodel
    spec = learner.inner_spec(learner.inner_steps, order, training=True)
    theta = {k: v.detach().clone().requires_grad_() for k, v in fm.params().items()}
    extra = {k: v.detach().clone().requires_grad_() for k, v in learner.extra_params().items()}
    leaves = {
        **{f"module.{k}": v for k, v in theta.items()},
        **{learner._extra_names[k]: v for k, v in extra.items()},
    }
    frozen = {k: v.detach() for k, v in fm.source.named_parameters() if not v.requires_grad}
    buffers = fm.buffers()
    xs, ys, xq, yq = tasks
    total = torch.zeros((), dtype=xs.dtype)

    def run(params: dict[str, Tensor], k: int, x: Tensor) -> Tensor:
        full = {**frozen, **params}
        if spec.step_params is not None:
            full.update(spec.step_params(extra, k))
        return functional_call(fm.template, (full, buffers), (x,))

    for i in range(xs.shape[0]):
        p = dict(theta)
        obj = torch.zeros((), dtype=xs.dtype)
        for k in range(spec.steps):
            with attention_for(order == 2):  # as the engine: math attention kernel at order 2
                loss = learner.loss_fn(run(p, k, xs[i]), ys[i])
            names = list(spec.adapt_names)
            gs = torch.autograd.grad(
                loss, [p[n] for n in names], create_graph=order == 2, allow_unused=True
            )
            for n, g in zip(names, gs):
                if g is not None:
                    p[n] = p[n] - spec.lr_rule(extra, k, n) * g
            if spec.step_weights is not None:
                obj = obj + spec.step_weights[k] * learner.loss_fn(run(p, k + 1, xq[i]), yq[i])
        if spec.step_weights is None or spec.steps == 0:
            obj = learner.loss_fn(run(p, spec.steps, xq[i]), yq[i])
        total = total + obj / xs.shape[0]
    gs = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), gs)}


def _check_arguments(learner: object, directions: int, step: float) -> None:
    if not isinstance(learner, MAML):
        raise TypeError(
            f"metagrad.check_meta_gradient: learner must be a metagrad.MAML-family learner, got "
            f"{type(learner).__name__}; Reptile's update is not the gradient of a loss, so there is "
            f"nothing to check against finite differences."
        )
    if directions < 1:
        raise ValueError(f"metagrad.check_meta_gradient: directions={directions} must be >= 1.")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < math.inf:
        raise ValueError(
            f"metagrad.check_meta_gradient: step={step!r} must be a finite number > 0 (the "
            f"central-difference step h, e.g. 1e-5); with h = 0 every difference is 0 and the "
            f"check would compare nothing."
        )


_Tasks = tuple[Tensor, Tensor, Tensor, Tensor]


def _grad_vector(
    ln: MAML, theta: Params, extra: Params, like: dict[str, Tensor], tasks: _Tasks, order: int
) -> Tensor:
    """The engine's meta-gradient at ``order``, flattened in the order of ``like``."""
    spec = ln.inner_spec(ln.inner_steps, order, training=True)
    res = meta_gradient(
        ln.objective, spec, theta, extra, tasks, strategy=ln.strategy, extra_names=ln._extra_names
    )
    return _flat(res.grads, like)


def _fd_error(
    ln: MAML,
    theta: Params,
    extra: Params,
    like: dict[str, Tensor],
    tasks: _Tasks,
    g2: Tensor,
    directions: int,
    step: float,
    seed: int,
) -> float:
    """Largest relative error of ``g2 . d`` against central differences over random ``d``."""
    spec = ln.inner_spec(ln.inner_steps, 2, training=True)
    gen = torch.Generator().manual_seed(seed)

    def value_at(d: Tensor, h: float) -> Tensor:
        shift = cast(dict[str, Tensor], tree_unflatten_vector(h * d, like))
        for k, v in like.items():
            v.add_(shift[k])
        try:
            return meta_gradient(
                ln.objective, spec, theta, extra, tasks, strategy=ln.strategy, need_grad=False
            ).loss
        finally:
            for k, v in like.items():
                v.sub_(shift[k])

    fd_err = 0.0
    with torch.no_grad():
        for _ in range(directions):
            d = torch.randn(g2.numel(), generator=gen, dtype=torch.float64)
            d /= d.norm()
            an = float(g2 @ d)
            # ReLU/max-pool losses are piecewise smooth: a step that crosses a kink spoils one
            # difference quotient but rarely three step sizes, so keep the best of h, h/10, h/100.
            errs = []
            for h in (step, step / 10, step / 100):
                fd = float((value_at(d, h) - value_at(d, -h)) / (2 * h))
                errs.append(abs(an - fd) / max(abs(fd), abs(an), 1e-12))
            fd_err = max(fd_err, min(errs))
    return fd_err


def check_meta_gradient(
    learner: MAML,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    *,
    directions: int = 3,
    step: float = 1e-5,
    fd_tol: float = 1e-6,
    ref_tol: float = 1e-10,
    seed: int = 0,
) -> CheckReport:
    """Check ``learner``'s meta-gradient on one meta-batch (see module docstring).

    Runs on a float64 deep copy: the learner and its model are not changed.

    Args:
        learner: a :class:`metagrad.MAML` (or subclass) instance.
        xs, ys, xq, yq: a meta-batch ``[T, K, ...]`` (cast to float64 where floating).
        directions: random directions for the finite-difference test.
        step: central-difference step ``h`` (float64).
        fd_tol, ref_tol: relative tolerances for the verdict.
        seed: seed of the random directions.

    Returns:
        A :class:`CheckReport`; ``str(report)`` is a readable summary.

    Raises:
        TypeError: ``learner`` is not a MAML-family learner (Reptile has no loss gradient).
    """
    _check_arguments(learner, directions, step)
    ln = copy.deepcopy(learner).double().train()
    ln.check_finite = True

    def f64(t: Tensor) -> Tensor:
        return t.double() if t.is_floating_point() else t

    tasks = (f64(xs), f64(ys), f64(xq), f64(yq))
    order = ln.current_order()
    theta, extra = ln.fmodel.params(), ln.extra_params()
    like = {
        **{f"module.{k}": v for k, v in theta.items()},
        **{ln._extra_names[k]: v for k, v in extra.items()},
    }
    # Finite differences test the exact gradient (first order is not the loss's gradient); the
    # unrolled reference tests the learner's own order.
    g1, g2 = (_grad_vector(ln, theta, extra, like, tasks, o) for o in (1, 2))
    g = g2 if order == 2 else g1
    fd_err = _fd_error(ln, theta, extra, like, tasks, g2, directions, step, seed)

    ref = reference_meta_gradient(ln, tasks, order)
    ref_err = None
    note = ""
    if ref is None:
        name = type(ln.inner_optimizer).__name__
        note = f"no unrolled reference for inner optimizer {name} (plain SGD only); FD only"
    else:
        r = _flat(ref, like)
        ref_err = float((g - r).norm() / r.norm().clamp_min(1e-300))

    dist = float((g1 - g2).norm() / g2.norm().clamp_min(1e-300))
    cos = float(g1 @ g2 / (g1.norm() * g2.norm()).clamp_min(1e-300))
    passed = fd_err <= fd_tol and (ref_err is None or ref_err <= ref_tol) and math.isfinite(fd_err)
    return CheckReport(
        algorithm=type(learner).__name__,
        order=order,
        inner_steps=ln.inner_steps,
        strategy=resolve_strategy(ln.strategy, ln.fmodel, "metagrad.check_meta_gradient"),
        fd_rel_error=fd_err,
        reference_rel_error=ref_err,
        first_order_rel_distance=dist,
        first_order_cosine=cos,
        directions=directions,
        step=step,
        num_meta_params=g.numel(),
        fd_tol=fd_tol,
        ref_tol=ref_tol,
        passed=passed,
        note=note,
    )
