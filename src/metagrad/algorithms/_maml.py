r"""MAML and its family (first order, Meta-SGD, LSLR, ANIL, MAML++ options) on any ``nn.Module``.

.. math::
    \theta' _i = \theta - \alpha \nabla_\theta L^{s}_i(\theta),\qquad
    \nabla_\theta \frac1T\sum_i L^{q}_i(\theta'_i)
      = \frac1T\sum_i \bigl(I - \alpha \nabla^2_\theta L^{s}_i(\theta)\bigr)\nabla L^{q}_i(\theta'_i)

(one SGD step shown; the engine differentiates any number of steps and any inner optimizer).

References:
    Finn et al., *Model-Agnostic Meta-Learning*, ICML 2017. Li et al., *Meta-SGD*, 2017.
    Antoniou et al., *How to train your MAML* (MAML++), ICLR 2019. Raghu et al., *ANIL*, ICLR 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metagrad import optim
from metagrad._typing import LossFn, Params
from metagrad.algorithms._base import Selector, UnrolledLearner, check_steps
from metagrad.algorithms._task import (
    InnerSpec,
    MetaResult,
    TaskLoss,
    make_inner_optimizer,
    meta_gradient,
    resolve_strategy,
)
from metagrad.bilevel import Cache
from metagrad.bilevel._problem import LR
from metagrad.functional._model import Recorder, dtype_device, norm_module_names, select_names

LEARN_LR = (None, "per_param", "per_step")


def _san(name: str) -> str:
    return name.replace(".", "__")


def msl_weights(steps: int, meta_step: int, anneal_steps: int) -> tuple[float, ...]:
    """MAML++ multi-step loss weights after ``meta_step`` meta-updates.

    Start uniform :math:`1/K`; non-final weights decay linearly to :math:`0.03/K` over
    ``anneal_steps`` meta-steps while the final weight grows to keep the sum at 1.
    """
    K = steps
    if K == 0:
        return ()
    decay = (1.0 / K) / max(anneal_steps, 1)
    floor = 0.03 / K
    w = [max(1.0 / K - meta_step * decay, floor) for _ in range(K - 1)]
    w.append(min(1.0 / K + meta_step * (K - 1) * decay, 1.0 - (K - 1) * floor))
    return tuple(w)


class MAML(UnrolledLearner):
    r"""Model-agnostic meta-learning with exact second-order meta-gradients.

    A thin wrapper over the functional engine: it never mutates ``model`` (a private template is
    run with ``torch.func.functional_call``); ``meta_loss(...).backward()`` writes the meta-gradient
    into ``model``'s parameters (and the learned inner learning rates) ``.grad``.

    Args:
        model: any ``nn.Module`` mapping a batch ``x [K, ...]`` to predictions.
        loss_fn: ``loss_fn(prediction, target) -> scalar`` (mean over one task's examples).
        inner_lr: inner step size :math:`\alpha` (initial value when learned).
        inner_steps: inner steps during meta-training.
        order: 2 for the exact meta-gradient, 1 for first-order MAML (FOMAML).
        eval_steps: inner steps in eval mode and the default of :meth:`adapt` (default ``inner_steps``).
        inner_optimizer: ``"sgd"``, ``"momentum"``, ``"adam"`` or a :mod:`metagrad.optim`
            optimizer such as ``metagrad.optim.SGD(momentum=0.9, weight_decay=1e-4)`` (its
            ``lr`` is replaced by ``inner_lr`` / the learned rates).
        learn_inner_lr: ``None`` (fixed), ``"per_param"`` (Meta-SGD: one learned rate per weight
            element) or ``"per_step"`` (MAML++ LSLR: one learned rate per parameter tensor per step).
        adapt: which parameters the inner loop adapts (ANIL): a name or module prefix, a list of
            them, or a predicate on names. The rest are meta-learned only. Default: all.
        multi_step_loss: MAML++ multi-step loss: the query loss after every inner step, weighted
            by annealed weights (see :func:`msl_weights`).
        msl_anneal_steps: meta-steps over which the multi-step weights anneal to the final step.
        first_order_steps: derivative-order annealing: first order for this many meta-steps, then
            ``order``.
        per_step_bn: MAML++ per-step normalization weights and biases: each inner step (and the
            query pass after the last) uses its own learned copy of every normalization layer's
            affine parameters; those are not adapted in the inner loop. With ``bn="running"``
            also per-step running statistics (buffers ``step_stats_s<k>__...``): updated from the
            batch statistics of each training call, read at step ``k`` in eval mode.
        bn: BatchNorm policy, ``"transductive"`` (default, batch statistics everywhere, as the MAML
            reference) or ``"running"`` (module mode decides; running stats read, never written).
        strategy: ``"auto"`` (default), ``"loop"``, ``"vmap"``, ``"hvp_chain"`` or
            ``"checkpoint"``; see ``metagrad.functional``.
        compile: ``torch.compile`` the vmapped meta-gradient (vmap strategy only; True = inductor,
            or a backend name or callable). Compiles once per inner-loop configuration and batch shape (the
            learner's :attr:`cache`), then runs several times faster than eager: for long runs
            (timings in BENCHMARKS.md).
        allow_unused: adapted parameters that do not reach the support loss are left unchanged
            instead of raising.
        memory_format: ``"auto"`` (default: channels-last activations for stock ``torch.nn``
            conv nets on CPU: faster, same values; see BENCHMARKS.md), ``"channels_last"`` or ``"preserve"``.
        check_finite: raise :class:`metagrad.NonFiniteError` naming the task and step on NaN/Inf.

    Example:
        >>> import torch, metagrad as mg
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> learner = mg.MAML(model, torch.nn.functional.mse_loss, inner_lr=0.1, inner_steps=1)
        >>> xs, ys, xq, yq = torch.randn(4, 5, 1), torch.randn(4, 5, 1), torch.randn(4, 5, 1), torch.randn(4, 5, 1)
        >>> loss = learner.meta_loss(xs, ys, xq, yq)
        >>> loss.backward()
        >>> model[0].weight.grad.shape
        torch.Size([8, 1])
    """

    fn_name = "metagrad.MAML"
    meta_step: Tensor

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 2,
        *,
        eval_steps: int | None = None,
        inner_optimizer: str | optim.Optimizer = "sgd",
        learn_inner_lr: str | None = None,
        adapt: Selector = None,
        multi_step_loss: bool = False,
        msl_anneal_steps: int = 1000,
        first_order_steps: int = 0,
        per_step_bn: bool = False,
        bn: str = "transductive",
        memory_format: str = "auto",
        strategy: str = "auto",
        compile: bool | str | Callable[..., Any] = False,
        allow_unused: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__(model, loss_fn, bn, memory_format)
        self._init_settings(
            inner_lr, inner_steps, order, eval_steps, inner_optimizer, learn_inner_lr,
            multi_step_loss, msl_anneal_steps, first_order_steps, strategy, compile,
            allow_unused, check_finite,
        )  # fmt: skip
        self.register_buffer("meta_step", torch.zeros((), dtype=torch.long))
        self.cache = Cache()  # compiled meta-gradients and one-time checks of this learner

        live = self.fmodel.params()
        norm_params = self._per_step_norm_params(model, per_step_bn)
        self.per_step_bn = bool(per_step_bn)
        candidates = [n for n in self.fmodel.trainable if n not in norm_params]
        self.adapt_names = tuple(select_names(candidates, adapt, self.fn_name, "adapt"))
        # Learned tensors live in this module (so learner.parameters() / state_dict() see them);
        # _extra_keys maps the engine's flat names to them.
        self._extra_keys: dict[str, tuple[str, str]] = {}
        self._init_learned_rates(live)
        self._init_step_norm(model, norm_params, live, bn, strategy)
        self._extra_names = {k: f"{d}.{key}" for k, (d, key) in self._extra_keys.items()}

    # -- construction, in parts ------------------------------------------------------------
    def _init_settings(
        self,
        inner_lr: float,
        inner_steps: int,
        order: int,
        eval_steps: int | None,
        inner_optimizer: str | optim.Optimizer,
        learn_inner_lr: str | None,
        multi_step_loss: bool,
        msl_anneal_steps: int,
        first_order_steps: int,
        strategy: str,
        compile: bool | str | Callable[..., Any],
        allow_unused: bool,
        check_finite: bool,
    ) -> None:
        """Validate and store the scalar settings (a ValueError/TypeError names the fix)."""
        self._init_inner_loop(inner_lr, inner_steps, eval_steps)
        fn = self.fn_name
        if order not in (1, 2) or isinstance(order, bool):
            raise ValueError(
                f"{fn}: order={order!r} must be 1 (first-order MAML) or 2 (exact second order)."
            )
        self.order = order
        self.inner_optimizer = make_inner_optimizer(inner_optimizer, fn)
        if learn_inner_lr not in LEARN_LR:
            raise ValueError(
                f"{fn}: learn_inner_lr={learn_inner_lr!r} is not known; use None, 'per_param' "
                f"(Meta-SGD) or 'per_step' (MAML++ LSLR)."
            )
        self.learn_inner_lr = learn_inner_lr
        self.multi_step_loss = bool(multi_step_loss)
        self.msl_anneal_steps = check_steps(fn, "msl_anneal_steps", msl_anneal_steps)
        self.first_order_steps = check_steps(fn, "first_order_steps", first_order_steps)
        self.strategy = strategy
        if not isinstance(compile, (bool, str)) and not callable(compile):
            raise TypeError(
                f"{fn}: compile={compile!r} must be True/False, a torch.compile backend name or "
                f"a backend callable."
            )
        self.use_compile = compile
        device = dtype_device(self.fmodel.params())[1]
        if compile and resolve_strategy(strategy, self.fmodel, fn, order, device) != "vmap":
            raise ValueError(
                f"{fn}: compile=True needs the vmap strategy, but this model runs with the per-task "
                f"loop (norm layers, RNNs, custom layers, conv nets on CPU, or "
                f"strategy={strategy!r}). Use compile=False: torch.compile measured no speed-up "
                f"on the loop of a conv net."
            )
        resolve_strategy(strategy, self.fmodel, fn, order)
        self.allow_unused = bool(allow_unused)
        self.check_finite = bool(check_finite)

    def _per_step_norm_params(self, model: nn.Module, per_step_bn: bool) -> list[str]:
        """The trainable normalization weights that get one copy per inner step (MAML++ BNWB)."""
        if not per_step_bn:
            return []
        mods = norm_module_names(model)
        trainable = self.fmodel.trainable
        norm_params = [n for n in trainable if any(n.startswith(m + ".") for m in mods)]
        if not norm_params:
            raise ValueError(
                f"{self.fn_name}: per_step_bn=True but the model has no trainable normalization "
                f"weights (BatchNorm/LayerNorm/GroupNorm with affine=True)."
            )
        return norm_params

    def _init_learned_rates(self, live: Params) -> None:
        """Meta-SGD per-parameter rates or MAML++ per-step rates (LSLR), as meta-parameters."""
        self.inner_lrs = nn.ParameterDict()
        if self.learn_inner_lr == "per_param":
            for n in self.adapt_names:
                self.inner_lrs[_san(n)] = nn.Parameter(
                    torch.full_like(live[n].detach(), self.inner_lr)
                )
                self._extra_keys[f"lr.{n}"] = ("inner_lrs", _san(n))
        elif self.learn_inner_lr == "per_step":
            p0 = live[self.adapt_names[0]]
            for n in self.adapt_names:
                size = max(self.inner_steps, self.eval_steps, 1)
                self.inner_lrs[_san(n)] = nn.Parameter(
                    torch.full((size,), self.inner_lr, dtype=p0.dtype, device=p0.device)
                )
                self._extra_keys[f"lr.{n}"] = ("inner_lrs", _san(n))

    def _init_step_norm(
        self, model: nn.Module, norm_params: list[str], live: Params, bn: str, strategy: str
    ) -> None:
        """Per-step normalization weights and, with ``bn="running"``, per-step statistics."""
        fn = self.fn_name
        self.step_norm = nn.ParameterDict()
        self._norm_params = tuple(norm_params)
        for k in range(max(self.inner_steps, self.eval_steps) + 1 if norm_params else 0):
            for n in norm_params:
                key = f"s{k}__{_san(n)}"
                self.step_norm[key] = nn.Parameter(live[n].detach().clone())
                self._extra_keys[f"bn{k}.{n}"] = ("step_norm", key)
        # MAML++ per-step running statistics: read in eval mode with bn="running", updated from
        # the batch statistics of every training forward (transductive BN never reads them).
        self._stat_modules: tuple[str, ...] = ()
        if self.per_step_bn and bn == "running":
            if strategy == "vmap":
                raise ValueError(
                    f"{fn}: per_step_bn=True with bn='running' records per-step statistics, which "
                    f"needs strategy='auto', 'loop', 'hvp_chain' or 'checkpoint', not 'vmap'."
                )
            self._stat_modules = tuple(self.fmodel.stat_norm_modules())
            bufs = dict(model.named_buffers())
            for k in range(max(self.inner_steps, self.eval_steps) + 1):
                for m in self._stat_modules:
                    for stat in ("mean", "var"):
                        src = bufs[f"{m}.running_{stat}"].detach().clone()
                        self.register_buffer(f"step_stats_s{k}__{_san(m)}__{stat}", src)
            self.fmodel.enable_stat_recording()

    # -- engine hooks ----------------------------------------------------------------------
    def make_objective(self) -> TaskLoss:
        return TaskLoss(
            self.fmodel,
            self.loss_fn,
            self._step_params if self.per_step_bn else None,
            self._step_buffers if self._stat_modules else None,
            fn_name=self.fn_name,
        )

    def extra_params(self) -> Params:
        return {k: getattr(self, d)[key] for k, (d, key) in self._extra_keys.items()}

    def current_order(self) -> int:
        return 1 if int(self.meta_step) < self.first_order_steps else self.order

    def default_eval_steps(self) -> int:
        return self.eval_steps

    def _lr_rule(self, extra: Params, step: int, name: str) -> LR:
        if self.learn_inner_lr == "per_param":
            return extra[f"lr.{name}"]
        if self.learn_inner_lr == "per_step":
            rates = extra[f"lr.{name}"]
            return rates[min(step, rates.shape[0] - 1)]
        return self.inner_lr

    def _step_params(self, extra: Params, step: int) -> Params:
        last = max(self.inner_steps, self.eval_steps)
        return {n: extra[f"bn{min(step, last)}.{n}"] for n in self._norm_params}

    def _step_buffers(self, step: int) -> dict[str, Tensor]:
        k = min(step, max(self.inner_steps, self.eval_steps))
        out: dict[str, Tensor] = {}
        for m in self._stat_modules:
            for stat in ("mean", "var"):
                out[f"{m}.running_{stat}"] = getattr(self, f"step_stats_s{k}__{_san(m)}__{stat}")
        return out

    @torch.no_grad()
    def _update_step_stats(self, records: list[tuple[str, int, Tensor, Tensor]]) -> None:
        """Running averages (the module's BN momentum) of the recorded per-step batch statistics."""
        groups: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}
        for name, step, mean, var in records:
            groups.setdefault((name, step), []).append((mean, var))
        last = max(self.inner_steps, self.eval_steps)
        for (name, step), vals in groups.items():
            module = self.module.get_submodule(name)
            raw = getattr(module, "momentum", None)
            mom: float = raw if isinstance(raw, float) else 0.1  # None (cumulative) -> 0.1
            k = min(step, last)
            for i, stat in enumerate(("mean", "var")):
                batch = torch.stack([v[i] for v in vals]).mean(0)
                buf = getattr(self, f"step_stats_s{k}__{_san(name)}__{stat}")
                buf.mul_(1 - mom).add_(mom * batch.to(buf.dtype))

    def inner_spec(self, steps: int, order: int, *, training: bool) -> InnerSpec:
        weights = None
        if self.multi_step_loss and training and steps > 0:
            weights = msl_weights(steps, int(self.meta_step), self.msl_anneal_steps)
        return self._spec(
            steps,
            order,
            self.adapt_names,
            self._lr_rule,
            step_params=self._step_params if self.per_step_bn else None,
            step_buffers=self._step_buffers if self._stat_modules else None,
            step_weights=weights,
        )

    # -- public API -------------------------------------------------------------------------
    def meta_result(
        self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, need_grad: bool = True
    ) -> MetaResult:
        """Mean query loss and its gradient per meta-parameter, without touching ``.grad``.

        With per-step running statistics (``per_step_bn=True, bn="running"``), a call in train
        mode also updates them from the batch statistics it saw.
        """
        theta = self.fmodel.params()
        tasks = self._tasks("meta_loss", xs, ys, xq, yq, theta)
        steps = self.inner_steps if self.training else self.eval_steps
        spec = self.inner_spec(steps, self.current_order(), training=self.training)
        records: Recorder | None = [] if self._stat_modules and self.training else None
        objective = self.objective
        if records is not None:
            objective = dataclasses.replace(objective, recorder=records)
        res = meta_gradient(
            objective,
            spec,
            theta,
            self.extra_params(),
            tasks,
            strategy=self.strategy,
            need_grad=need_grad,
            compile=self.use_compile,
            cache=self.cache,
            extra_names=self._extra_names,
        )
        if records:
            self._update_step_stats(records)
        return res

    def attach(self, res: MetaResult) -> Tensor:
        """As :meth:`Learner.attach`; in train mode it counts one meta-step (for
        ``first_order_steps`` and ``multi_step_loss`` annealing)."""
        if self.training:
            self.meta_step += 1
        return super().attach(res)
