r"""What a bilevel problem is: objectives, an inner optimizer, steps, data, and what is learned.

.. math::
    w_0 \text{ given},\qquad w_{k+1} = U_k\bigl(w_k, \nabla_w f(w_k, h, b_k), s_k; h\bigr),\quad
    k = 0..K-1,\qquad
    G(w_0, h) = \sum_{k=1}^{K} c_k\, g(w_k, h, b^{out}) \quad (c = e_K \text{ by default}),

where :math:`f` is the inner objective, :math:`g` the outer objective, :math:`U` the inner
optimizer (with state :math:`s_k`), :math:`b_k` the inner batch of step :math:`k`. The engine
returns :math:`G` and its exact gradient with respect to the initialization :math:`w_0`, the
hyperparameters :math:`h` (any pytree of tensors the objectives read) and the optimizer's own
tensor hyperparameters (learning rate, weight decay...). MAML is the instance where
:math:`w_0 = \theta`, :math:`f` is a task's support loss and :math:`g` its query loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad._typing import Params

LR = float | Tensor
LRRule = Callable[[Any, int, str], LR]
"""``lr(h, step, name)``: learning rate of parameter ``name`` at inner ``step`` (read from ``h``)."""


Objective = Callable[..., Tensor]
"""``f(w, h, batch) -> scalar`` (or ``f(w, h, batch, step)`` for a stepwise problem)."""


class Optimizer(Protocol):
    """The differentiable-optimizer protocol of :mod:`metagrad.optim` (what the engine calls)."""

    def init(self, params: Params) -> Any: ...

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: dict[str, LR] | None = None,
    ) -> tuple[Params, Any]: ...

    def hyperparams(self) -> dict[str, Tensor]: ...

    def with_hyperparams(self, values: dict[str, Tensor]) -> Optimizer: ...


@dataclass(frozen=True)
class PerStep:
    """Inner data that changes every step: ``batches[k]`` is the inner batch of step ``k``.

    Anything that is not a ``PerStep`` is one batch, used at every inner step.
    """

    batches: Sequence[Any]


@dataclass(frozen=True)
class Problem:
    r"""A bilevel problem: everything but the tensors it is differentiated for.

    Args:
        inner: inner objective ``f(w, h, batch) -> scalar`` minimized by ``optimizer``.
        outer: outer objective ``g(w, h, batch) -> scalar`` evaluated after the inner steps.
        optimizer: a :mod:`metagrad.optim` optimizer (any object with its protocol).
        steps: number of inner steps :math:`K \ge 0`.
        order: 2 differentiates through the inner gradients (exact); 1 treats them as constants
            (first-order approximation, e.g. FOMAML).
        lr: optional rule ``lr(h, step, name)`` replacing the optimizer's learning rate, e.g. a
            learned per-step schedule stored in ``h``.
        outer_weights: :math:`c_1..c_K`: the outer objective is evaluated after every inner step
            and weighted (MAML++'s multi-step loss); None evaluates it after step ``K`` only.
        stepwise: objectives take the inner step as a fourth argument (``steps`` for the outer
            objective after the last step): for per-step parameters or statistics.
        allow_unused: inner parameters that do not reach the inner objective keep their value
            instead of raising.
        allow_unused_hyper: hyperparameters whose gradient does not exist (they do not reach the
            outer objective) get None instead of raising.
        check_finite: NaN/Inf raise :class:`metagrad.NonFiniteError` naming the problem index,
            the inner step and the tensor.
        name: the public function named in error messages.
        unit: what one problem is called in messages (``"task"`` for MAML).
        inner_name, outer_name: what the objectives are called in messages.
        prepare: optional map :math:`h \mapsto \tilde h` applied once per problem before the
            inner loop; the objectives and the ``lr`` rule receive :math:`\tilde h`, and the
            hypergradient is still with respect to ``h`` (the chain rule runs through
            ``prepare``). E.g. ``lambda h: {"lr": h["log_lr"].exp().unbind()}`` computes a
            log-parametrized learning rate once instead of at every inner step.
    """

    inner: Objective
    outer: Objective
    optimizer: Optimizer
    steps: int
    order: int = 2
    lr: LRRule | None = None
    outer_weights: tuple[float, ...] | None = None
    stepwise: bool = False
    allow_unused: bool = False
    allow_unused_hyper: bool = False
    check_finite: bool = True
    name: str = "metagrad.bilevel.hypergrad"
    unit: str = "problem"
    inner_name: str = "inner objective"
    outer_name: str = "outer objective"
    prepare: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        fn = self.name
        if not callable(self.inner) or not callable(self.outer):
            raise TypeError(
                f"{fn}: inner and outer must be callables f(w, h, batch) -> scalar tensor, got "
                f"{type(self.inner).__name__} and {type(self.outer).__name__}."
            )
        if self.prepare is not None and not callable(self.prepare):
            raise TypeError(
                f"{fn}: prepare={self.prepare!r} must be a callable h -> what the objectives "
                f"receive (or None)."
            )
        if not (hasattr(self.optimizer, "init") and hasattr(self.optimizer, "update")):
            raise TypeError(
                f"{fn}: optimizer={self.optimizer!r} has no init/update; pass a metagrad.optim "
                f"optimizer such as metagrad.optim.SGD(lr=0.1)."
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"{fn}: steps={self.steps!r} must be an int >= 0.")
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(
                f"{fn}: order={self.order!r} must be 2 (exact) or 1 (first-order approximation)."
            )
        if self.outer_weights is not None and len(self.outer_weights) != self.steps:
            raise ValueError(
                f"{fn}: outer_weights has {len(self.outer_weights)} entries for steps="
                f"{self.steps}; give one weight per inner step (or None for the last step only)."
            )

    def hyper(self, h: Any) -> Any:
        """What the objectives and the ``lr`` rule receive: ``prepare(h)``, or ``h``."""
        return h if self.prepare is None else self.prepare(h)

    def call_inner(self, w: Params, h: Any, batch: Any, step: int) -> Tensor:
        out = self.inner(w, h, batch, step) if self.stepwise else self.inner(w, h, batch)
        return _scalar(self, out, self.inner_name)

    def call_outer(self, w: Params, h: Any, batch: Any, step: int) -> Tensor:
        out = self.outer(w, h, batch, step) if self.stepwise else self.outer(w, h, batch)
        return _scalar(self, out, self.outer_name)

    def weight(self, k: int) -> float:
        """:math:`c_k`, the weight of the outer objective after step ``k`` (0 <= k <= K)."""
        if self.outer_weights is None or self.steps == 0:
            return 1.0 if k == self.steps else 0.0
        return float(self.outer_weights[k - 1]) if k >= 1 else 0.0


def _scalar(problem: Problem, out: object, which: str) -> Tensor:
    # Autograd's "grad can be implicitly created only for scalar outputs" does not say which
    # objective is at fault; under vmap the shape seen here is the per-problem one.
    if not isinstance(out, Tensor) or out.dim() != 0:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{problem.name}: the {which} must return a scalar tensor (one {problem.unit}'s mean "
            f"loss), got {got}. Reduce it, e.g. reduction='mean' or .mean()."
        )
    if not out.is_floating_point():
        raise TypeError(
            f"{problem.name}: the {which} returned dtype {out.dtype}; it must be a floating "
            f"point scalar (cast the loss with .float())."
        )
    return out


class MetaParams(NamedTuple):
    """What the outer gradient is taken with respect to (and the same shape for gradients).

    Attributes:
        w0: initial inner parameters (name -> tensor); MAML's meta-learned initialization.
        h: hyperparameters: any pytree of tensors (dict, tuple, NamedTuple) the objectives or
            the learning-rate rule read. Leaves without ``requires_grad`` are constants.
        opt: the optimizer's tensor hyperparameters (``optimizer.hyperparams()``).
    """

    w0: Params
    h: Any = None
    opt: dict[str, Tensor] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)


@dataclass
class HyperGrad:
    """Result of :func:`metagrad.bilevel.hypergrad`.

    Attributes:
        value: mean outer objective over problems (detached).
        per_problem: the outer objective of each problem, ``[P]`` (``[1]`` when not batched).
        grads: gradients shaped like the :class:`MetaParams` given; None for every leaf that
            does not require grad (and, with ``allow_unused_hyper``, for unused ones).
        foreign: tensors that require grad, were closed over by an objective (not passed in
            ``h``) and reach the outer objective, with their exact gradients.
        w: final inner parameters of each problem, detached (stacked ``[P, ...]`` when batched).
        strategy: the strategy that ran.
    """

    value: Tensor
    per_problem: Tensor
    grads: MetaParams
    foreign: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    w: Params | None = None
    strategy: str = ""

    def attach(self, params: MetaParams) -> Tensor:
        """``value`` as a tensor whose ``backward()`` hands the gradients to ``params``' leaves
        (and to the closed-over ``foreign`` tensors): the ``loss.backward()`` workflow."""
        p_flat = flatten(params)
        g_flat = flatten(self.grads)
        pairs = [(p, g) for p, g in zip(p_flat, g_flat) if isinstance(p, Tensor)]
        return attach_pairs(self.value, [*pairs, *self.foreign])


def attach_pairs(value: Tensor, pairs: Sequence[tuple[Tensor, Tensor | None]]) -> Tensor:
    """``value`` as a tensor whose ``backward()`` adds each gradient to its tensor's ``.grad``."""
    out: Tensor = AttachGrad.apply(value, tuple(g for _, g in pairs), *(t for t, _ in pairs))
    return out


def flatten(mp: MetaParams) -> list[Any]:
    """Leaves of ``(w0, h, opt)`` in a fixed order (None and non-tensor leaves included)."""
    return pytree.tree_flatten(tuple(mp))[0]


class AttachGrad(torch.autograd.Function):
    """``value`` as a tensor whose backward hands precomputed gradients to ``leaves``.

    Lets ``loss.backward()`` deliver a hypergradient computed problem by problem (or under
    ``torch.func``) without keeping any problem's graph alive.
    """

    @staticmethod
    def forward(
        ctx: Any, value: Tensor, grads: tuple[Tensor | None, ...], *leaves: Tensor
    ) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, None, *(None if g is None else g * grad_out for g in ctx.grads))
