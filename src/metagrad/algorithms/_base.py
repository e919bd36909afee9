"""The learner protocol, in two kinds, and their shared plumbing.

Every learner maps a meta-batch to a :class:`MetaResult` (``meta_result``): the mean query loss
and a gradient keyed like ``learner.named_parameters()``. ``meta_loss``, ``meta_grad`` and
``attach`` (the hook distributed training uses to all-reduce before delivery) are written once
on top of it. The two kinds differ in how a task is adapted:

* :class:`UnrolledLearner` (MAML family, Reptile): an inner loop described by an
  :class:`InnerSpec`, run by the bilevel engine;
* :class:`ImplicitLearner` (iMAML): an inner *solution*, differentiated implicitly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metagrad._typing import LossFn, Params
from metagrad.algorithms._task import (
    InnerSpec,
    LRRule,
    MetaResult,
    TaskLoss,
    resolve_strategy,
    run_task,
)
from metagrad.bilevel._problem import attach_pairs
from metagrad.bilevel._vmap import note_vmap_failure
from metagrad.functional._checks import check_task, check_tasks
from metagrad.functional._model import FunctionalModel, dtype_device
from metagrad.optim import Optimizer


def check_lr(fn_name: str, inner_lr: object) -> float:
    """A finite inner learning rate >= 0 (a Python number or a 0-d tensor without grad)."""
    if isinstance(inner_lr, Tensor) and inner_lr.numel() == 1:
        if inner_lr.requires_grad:
            raise ValueError(
                f"{fn_name}: inner_lr is a tensor that requires grad; to meta-learn the inner "
                f"rate use learn_inner_lr='per_param' (Meta-SGD) or 'per_step' (MAML++), which "
                f"start from this value: pass inner_lr={float(inner_lr.detach())}."
            )
        inner_lr = float(inner_lr)
    if (
        isinstance(inner_lr, bool)
        or not isinstance(inner_lr, (int, float))
        or not math.isfinite(inner_lr)
        or inner_lr < 0
    ):
        raise ValueError(
            f"{fn_name}: inner_lr={inner_lr!r} must be a finite number >= 0 (typical: 0.01 to 0.4)."
        )
    return float(inner_lr)


def check_steps(fn_name: str, name: str, steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(
            f"{fn_name}: {name}={steps!r} must be an int >= 0 (0 means no adaptation)."
        )
    return steps


class Learner(nn.Module, ABC):
    """Base class: owns the user's model (as ``self.module``) and its functional view."""

    fn_name = "metagrad.Learner"

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, bn: str, memory_format: str = "auto"
    ) -> None:
        super().__init__()
        self.fmodel = FunctionalModel.from_module(
            model, bn, memory_format=memory_format, fn_name=self.fn_name
        )
        if not self.fmodel.trainable:
            raise ValueError(
                f"{self.fn_name}: the model has no parameter with requires_grad=True; there is "
                f"nothing to meta-learn."
            )
        if not callable(loss_fn):
            raise TypeError(
                f"{self.fn_name}: loss_fn must be callable as loss_fn(prediction, target) -> scalar, "
                f"got {type(loss_fn).__name__} (e.g. torch.nn.functional.mse_loss)."
            )
        self.module = model
        self.loss_fn = loss_fn

    @property
    def objective(self) -> TaskLoss:
        """The support/query objective; rebuilt only when ``loss_fn`` is replaced, so compiled
        functions keyed on it are reused across meta-steps."""
        obj = self.__dict__.get("_objective")
        if obj is None or obj.loss_fn is not self.loss_fn:
            obj = self.make_objective()
            self.__dict__["_objective"] = obj
        return obj

    def make_objective(self) -> TaskLoss:
        return TaskLoss(self.fmodel, self.loss_fn, fn_name=self.fn_name)

    def _init_inner_loop(self, inner_lr: object, inner_steps: object, eval_steps: object) -> None:
        """Validate and store ``inner_lr``, ``inner_steps`` and ``eval_steps`` (``None``: as
        many as ``inner_steps``); a ValueError names the fix."""
        fn = self.fn_name
        self.inner_lr = check_lr(fn, inner_lr)
        self.inner_steps = check_steps(fn, "inner_steps", inner_steps)
        self.eval_steps = (
            self.inner_steps if eval_steps is None else check_steps(fn, "eval_steps", eval_steps)
        )

    # -- the contract ----------------------------------------------------------------------
    @abstractmethod
    def meta_result(
        self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, need_grad: bool = True
    ) -> MetaResult:
        """Mean query loss over tasks and its gradient keyed like ``named_parameters()``."""

    @abstractmethod
    def adapt(
        self, x: Tensor, y: Tensor, steps: int | None = None, *, differentiable: bool = False
    ) -> Params:
        """One task's adapted parameters (every parameter by name, usable with predict)."""

    @abstractmethod
    def default_eval_steps(self) -> int:
        """Inner steps used in eval mode and by :meth:`adapt` by default."""

    def current_order(self) -> int:
        return 1

    # -- written once -----------------------------------------------------------------------
    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        r"""Mean over tasks of the query loss after adaptation; ``.backward()`` gives the meta-gradient.

        Args:
            xs: support inputs ``[T, K, ...]``; ys: support targets ``[T, K, ...]``.
            xq: query inputs ``[T, Q, ...]``; yq: query targets ``[T, Q, ...]``.

        Returns:
            A scalar. Its gradient is computed here, task by task or vmapped, and handed to the
            parameters by ``backward()``; no task's graph is kept alive. Under ``torch.no_grad()``
            only the value is computed (validation).

        Raises:
            ValueError, TypeError: malformed task tensors (message names the tensor and the fix).
            NonFiniteError: NaN/Inf, naming the task index and inner step.
        """
        need_grad = torch.is_grad_enabled()
        res = self.meta_result(xs, ys, xq, yq, need_grad=need_grad)
        if not need_grad:
            return res.loss
        return self.attach(res)

    def attach(self, res: MetaResult) -> Tensor:
        """``res.loss`` as a tensor whose ``backward()`` delivers ``res.grads`` (and the gradients
        of closed-over tensors in ``res.foreign``).

        The hook for code that transforms the meta-gradient before delivery (e.g. the
        all-reduce of ``metagrad.distributed``).
        """
        named = dict(self.named_parameters())
        pairs = [(named[k], g) for k, g in res.grads.items()] + list(res.foreign)
        return attach_pairs(res.loss, pairs)

    def meta_grad(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> dict[str, Tensor | None]:
        """The meta-gradient keyed like ``learner.named_parameters()`` (``.grad`` untouched)."""
        return self.meta_result(xs, ys, xq, yq).grads

    # -- shared helpers ---------------------------------------------------------------------
    # Learners with a task loop of their own (Reptile, iMAML) batch it in one vmap on the models
    # where MAML's "auto" would; iMAML also applies the size rule (vmap_pays), first-order
    # Reptile measured faster batched without it. None: not decided yet; False: vmap failed once
    # on this model (the loop runs).
    _vmap_ok: bool | None = None

    def _batches_tasks(self, theta: Params) -> bool:
        """Whether this learner's tasks may run in one ``vmap``: vmap-safe model, not a
        channels-last conv net on CPU (:func:`resolve_strategy`'s ``auto``), no earlier failure."""
        _, device = self._dtype_device(theta)
        if self._vmap_ok is False:
            return False
        return resolve_strategy("auto", self.fmodel, self.fn_name, device=device) == "vmap"

    def _vmap_failed(self, err: BaseException) -> None:
        """An op without a batching rule: log it once and run the per-task loop from now on."""
        self._vmap_ok = False
        note_vmap_failure(None, None, err, self.fn_name, "vmap over tasks failed",
                          "the per-task loop runs instead")  # fmt: skip

    def _dtype_device(self, theta: Params | None = None) -> tuple[torch.dtype, torch.device]:
        return dtype_device(self.fmodel.params() if theta is None else theta)

    def _tasks(
        self,
        name: str,
        xs: object,
        ys: object,
        xq: object,
        yq: object,
        theta: Params | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The meta-batch checked against the parameters' dtype and device (``theta``: the
        trainable parameters when the caller has them already)."""
        dtype, device = self._dtype_device(theta)
        return check_tasks(f"{self.fn_name}.{name}", xs, ys, xq, yq, dtype, device)

    def predict(self, params: Params, x: Tensor) -> Tensor:
        """Model output for inputs ``x`` with parameters ``params`` (e.g. from :meth:`adapt`)."""
        if not isinstance(params, dict):
            raise TypeError(
                f"{self.fn_name}.predict: params must be the dict returned by adapt(), got "
                f"{type(params).__name__}."
            )
        missing = [k for k in self.fmodel.trainable if k not in params]
        if missing:
            raise ValueError(
                f"{self.fn_name}.predict: params lacks {missing}; pass the dict returned by adapt()."
            )
        self.fmodel.sync_modes()
        return self.fmodel.forward(params, self.fmodel.buffers(), x)


class UnrolledLearner(Learner):
    """A learner whose tasks run an inner loop (:class:`InnerSpec`) through the bilevel engine."""

    inner_optimizer: Optimizer
    allow_unused: bool
    check_finite: bool

    def extra_params(self) -> Params:
        """Meta-learned tensors besides the model's parameters (learned inner LRs...)."""
        return {}

    @abstractmethod
    def inner_spec(self, steps: int, order: int, *, training: bool) -> InnerSpec:
        """The inner loop for ``steps`` steps at ``order`` (in train or eval mode)."""

    def _spec(
        self, steps: int, order: int, adapt_names: tuple[str, ...], lr_rule: LRRule, **more: Any
    ) -> InnerSpec:
        """An :class:`InnerSpec` with this learner's optimizer, ``allow_unused``,
        ``check_finite`` and name; ``more`` sets its other fields."""
        return InnerSpec(
            steps=steps,
            order=order,
            optimizer=self.inner_optimizer,
            adapt_names=adapt_names,
            lr_rule=lr_rule,
            allow_unused=self.allow_unused,
            check_finite=self.check_finite,
            fn_name=self.fn_name,
            **more,
        )

    def adapt(
        self, x: Tensor, y: Tensor, steps: int | None = None, *, differentiable: bool = False
    ) -> Params:
        """Adapt to one task's support set; return every parameter by name (adapted or not).

        Args:
            x: support inputs ``[K, ...]``.
            y: support targets ``[K, ...]``.
            steps: inner steps (default: the learner's evaluation step count).
            differentiable: keep the graph to the meta-parameters (second order if the learner's
                order is 2); default returns detached tensors for evaluation.

        Returns:
            ``dict`` name -> tensor usable with :meth:`predict`.
        """
        fn = f"{self.fn_name}.adapt"
        x, y = check_task(fn, x, y, *self._dtype_device())
        steps = self.default_eval_steps() if steps is None else check_steps(fn, "steps", steps)
        order = self.current_order() if differentiable else 1
        spec = self.inner_spec(steps, order, training=False)
        theta = self.fmodel.params()
        extra = self.extra_params()
        if not differentiable:
            theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
            extra = {k: v.detach() for k, v in extra.items()}
        self.fmodel.sync_modes()
        with torch.enable_grad():
            _, adapted = run_task(
                self.objective, spec, None, theta, extra, self.fmodel.buffers(), x, y
            )
        if not differentiable:
            adapted = {k: v.detach() for k, v in adapted.items()}
        return adapted


class ImplicitLearner(Learner):
    """A learner whose tasks are differentiated at an inner solution (implicit gradients)."""

    @abstractmethod
    def solve_inner(
        self,
        theta: Params,
        buffers: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        steps: int,
        task: int = 0,
    ) -> Params:
        """An approximate inner solution from ``theta`` on one support set (detached)."""


Selector = None | str | list[str] | tuple[str, ...] | Callable[[str], bool]
