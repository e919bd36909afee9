r"""Reptile: first-order meta-learning by moving towards the adapted weights.

.. math::
    g = \frac1T \sum_i (\theta - \phi_i),\qquad \phi_i = U^K(\theta;\ \text{support}_i)

``meta_loss(...).backward()`` puts :math:`g` into ``.grad``, so ``SGD(lr=eps)`` reproduces the
paper's update :math:`\theta \leftarrow \theta + \epsilon(\bar\phi - \theta)`; any torch optimizer
works on it. The returned value is the mean query loss after adaptation (for monitoring).

Reference: Nichol, Achiam, Schulman, *On First-Order Meta-Learning Algorithms*, 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagrad import optim
from metagrad._errors import check_finite
from metagrad._typing import LossFn, Params
from metagrad.algorithms._base import UnrolledLearner
from metagrad.algorithms._task import InnerSpec, MetaResult, make_inner_optimizer, run_task


class Reptile(UnrolledLearner):
    """Reptile on any ``nn.Module`` (see module docstring for the math).

    Args:
        model: the module to meta-learn (never mutated).
        loss_fn: ``loss_fn(prediction, target) -> scalar``.
        inner_lr: inner step size.
        inner_steps: inner steps per task during meta-training.
        eval_steps: default steps of :meth:`adapt` (default ``inner_steps``).
        inner_optimizer: ``"sgd"`` (default), ``"momentum"``, ``"adam"`` or an optimizer object.
        bn: BatchNorm policy (see :class:`metagrad.MAML`).
        memory_format: ``"auto"`` (default: channels-last activations for stock ``torch.nn``
            conv nets on CPU: faster, same values; see BENCHMARKS.md), ``"channels_last"`` or ``"preserve"``.
        allow_unused: leave parameters without support gradient unchanged instead of raising.
    """

    fn_name = "metagrad.Reptile"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        *,
        eval_steps: int | None = None,
        inner_optimizer: str | optim.Optimizer = "sgd",
        bn: str = "transductive",
        memory_format: str = "auto",
        allow_unused: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__(model, loss_fn, bn, memory_format)
        self._init_inner_loop(inner_lr, inner_steps, eval_steps)
        self.inner_optimizer = make_inner_optimizer(inner_optimizer, self.fn_name)
        self.allow_unused, self.check_finite = bool(allow_unused), bool(check_finite)

    def default_eval_steps(self) -> int:
        return self.eval_steps

    def inner_spec(self, steps: int, order: int, *, training: bool) -> InnerSpec:
        return self._spec(steps, 1, tuple(self.fmodel.trainable), lambda extra, k, n: self.inner_lr)

    def meta_result(
        self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, need_grad: bool = True
    ) -> MetaResult:
        """Mean query loss after adaptation and the Reptile direction ``theta - mean(phi)``.

        ``meta_loss(...).backward()`` writes the direction into ``.grad``.
        """
        xs, ys, xq, yq = self._tasks("meta_loss", xs, ys, xq, yq)
        steps = self.inner_steps if self.training else self.eval_steps
        spec = self.inner_spec(steps, 1, training=self.training)
        theta = self.fmodel.params()
        T = xs.shape[0]
        direction: Params = {k: torch.zeros_like(v) for k, v in theta.items()}
        losses = []
        self.fmodel.sync_modes()
        buffers = self.fmodel.buffers()
        for i in range(T):
            th = {k: v.detach().requires_grad_() for k, v in theta.items()}
            with torch.enable_grad():
                _, phi = run_task(self.objective, spec, None, th, {}, buffers, xs[i], ys[i], task=i)
            with torch.no_grad():
                q = self.loss_fn(
                    self.fmodel.forward({k: phi[k] for k in theta}, buffers, xq[i]), yq[i]
                )
                if self.check_finite:
                    check_finite(self.fn_name, q, "query loss", i, None)
                losses.append(q)
                for k in theta:
                    direction[k] += (theta[k].detach() - phi[k].detach()) / T
        per_task = torch.stack(losses)
        grads: dict[str, Tensor | None] = {f"module.{k}": g for k, g in direction.items()}
        return MetaResult(per_task.mean(), grads if need_grad else {}, per_task, [])
