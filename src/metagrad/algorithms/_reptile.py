r"""Reptile: first-order meta-learning by moving towards the adapted weights.

.. math::
    g = \frac1T \sum_i (\theta - \phi_i),\qquad \phi_i = U^K(\theta;\ \text{support}_i)

``meta_loss(...).backward()`` puts :math:`g` into ``.grad``, so ``SGD(lr=eps)`` reproduces the
paper's update :math:`\theta \leftarrow \theta + \epsilon(\bar\phi - \theta)`; any torch optimizer
works on it. The returned value is the mean query loss after adaptation (for monitoring).

Reference: Nichol, Achiam, Schulman, *On First-Order Meta-Learning Algorithms*, 2018.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from metagrad import optim
from metagrad._errors import check_finite
from metagrad._typing import LossFn, Params
from metagrad.algorithms._base import UnrolledLearner
from metagrad.algorithms._task import (
    InnerSpec,
    MetaResult,
    make_inner_optimizer,
    refuse_learned_hyperparams,
    refuse_update_closure,
    run_task,
    split,
    task_problem,
)
from metagrad.bilevel._foreign import describe, foreign_leaves
from metagrad.bilevel._inner import FuncBackend, run
from metagrad.bilevel._problem import MetaParams
from metagrad.bilevel._vmap import check_reaches_inner


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
        refuse_learned_hyperparams(
            self.inner_optimizer,
            self.fn_name,
            "Reptile's update theta - phi is not the gradient of a loss",
        )
        self.allow_unused, self.check_finite = bool(allow_unused), bool(check_finite)
        self._closures_checked = False

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
        self.fmodel.sync_modes()
        buffers = self.fmodel.buffers()
        if need_grad and not self._closures_checked:
            self._refuse_closures(theta, buffers, (xs[0], ys[0], xq[0], yq[0]))
        vmapped = self._vmapped(spec, theta, buffers, (xs, ys, xq, yq)) if T > 1 else None
        if vmapped is not None:
            per_task, phis = vmapped
            grads_v: dict[str, Tensor | None] = {
                f"module.{k}": theta[k].detach() - phis[k].mean(0) for k in theta
            }
            return MetaResult(per_task.mean(), grads_v if need_grad else {}, per_task, [])
        direction: Params = {k: torch.zeros_like(v) for k, v in theta.items()}
        losses = []
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

    def _refuse_closures(
        self, theta: Params, buffers: dict[str, Tensor], task: tuple[Tensor, ...]
    ) -> None:
        r"""Raise if ``loss_fn`` or the inner optimizer's update closes over tensors that
        require grad (structural: once).

        Reptile's direction :math:`\theta - \phi` is not the gradient of a loss, so such a
        tensor (a learnable loss weight, a decay rate inside a custom update) would silently
        keep ``.grad`` None.
        """
        th = {k: v.detach().requires_grad_() for k, v in theta.items()}
        xs, ys, xq, yq = task
        with torch.enable_grad():
            losses = [
                self.loss_fn(self.fmodel.forward(th, buffers, x), y)
                for x, y in ((xs, ys), (xq, yq))
            ]
            stray = foreign_leaves([v for v in losses if v.requires_grad], list(th.values()))
        if stray:
            raise ValueError(
                f"{self.fn_name}: loss_fn closes over tensors that require grad ({describe(stray)}); "
                f"Reptile's update theta - phi is not the gradient of a loss, so they would get "
                f"no gradient. Fix: detach them (or set requires_grad=False), or learn them with "
                f"metagrad.MAML (order=1 for FOMAML), which differentiates the query loss."
            )
        refuse_update_closure(
            self.inner_optimizer,
            theta,
            self.inner_lr,
            self.fn_name,
            "Reptile's update theta - phi is not the gradient of a loss",
        )
        self._closures_checked = True

    def _vmapped(
        self, spec: InnerSpec, theta: Params, buffers: dict[str, Tensor], tasks: tuple[Tensor, ...]
    ) -> tuple[Tensor, Params] | None:
        """Per-task query losses and adapted weights of all tasks in one ``vmap``, or None.

        Reptile's tasks are independent first-order inner loops, so ``vmap`` runs them at once
        on vmap-safe models (not channels-last conv nets on CPU). MAML's size rule
        (``vmap_pays``) is not applied: without the double backward's parameter-sized batched
        temporaries, batching measured faster than the loop up to 412k parameters (BENCHMARKS.md,
        2026-12-03 later). None means "run the per-task loop": the model is not vmap-safe, an op has no
        batching rule (logged once, then the loop is used for this learner), or a result is not
        finite (the loop then raises the error that names the task and step).
        """
        if not self._batches_tasks(theta):
            return None
        problem = dataclasses.replace(task_problem(spec, self.objective), check_finite=False)
        th = {k: v.detach() for k, v in theta.items()}
        xs, ys, xq, yq = tasks
        if self._vmap_ok is None and not self.allow_unused:
            # torch.func.grad returns zeros for a weight the support loss does not reach; the
            # loop raises there, so the first call checks it (structural: once per learner).
            w0, h = split(spec, th, {}, buffers)
            check_reaches_inner(problem, MetaParams(w0, h, {}), (xs[0], ys[0]), False)
        backend = FuncBackend(create_graph=False)

        def one(x: Tensor, y: Tensor, xq_: Tensor, yq_: Tensor) -> tuple[Tensor, Params]:
            w0, h = split(spec, th, {}, buffers)
            obj, w, _ = run(problem, backend, w0, h, {}, (x, y), (xq_, yq_))
            assert obj is not None
            final = self.objective.params_at(w, h, spec.steps)
            return obj, {k: final[k] for k in th}

        try:
            per_task, phis = torch.func.vmap(one, randomness="different")(xs, ys, xq, yq)
        except RuntimeError as err:  # an op without a batching rule: the loop, from now on
            self._vmap_failed(err)
            return None
        self._vmap_ok = True
        if self.check_finite:
            flat = torch.cat([per_task.reshape(-1), *(v.reshape(-1) for v in phis.values())])
            if not bool(flat.isfinite().all()):
                return None  # the loop names the task and step
        return per_task.detach(), {k: v.detach() for k, v in phis.items()}
