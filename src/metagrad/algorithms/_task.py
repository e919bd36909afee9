r"""A meta-batch of few-shot tasks as a batch of bilevel problems (what every learner builds).

For task :math:`i` with support :math:`(x^s, y^s)` and query :math:`(x^q, y^q)`:

.. math::
    w_0 = \theta_A,\qquad w_{k+1} = U(w_k, \nabla_w L_s(w_k), a_k),\qquad
    \mathcal{L}_i(\theta) = \sum_{k=1}^{K} c_k\, L_q(w_k)\quad (c = e_K \text{ by default}),

a :class:`metagrad.bilevel.Problem` whose inner and outer objectives are the model's loss on the
support and on the query set, whose initialization :math:`w_0` is the adapted subset
:math:`\theta_A` of the model's parameters, and whose hyperparameters are a :class:`TaskHyper`:
the parameters that are meta-learned but not adapted (ANIL's body), the learned extras (inner
learning rates, per-step norm weights) and the model's buffers (constants).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metagrad import optim
from metagrad._typing import Buffers, LossFn, Params
from metagrad.bilevel import Cache, Problem, hypergrad
from metagrad.bilevel._inner import AutogradBackend, GradBackend, run
from metagrad.bilevel._problem import LR
from metagrad.functional._model import FunctionalModel, Recorder

# The MAML family's strategies (the one list of this layer) and the engine strategy each runs.
_BILEVEL = {"loop": "unroll", "vmap": "vmap", "hvp_chain": "adjoint", "checkpoint": "checkpoint"}
STRATEGIES = ("auto", *_BILEVEL)

LRRule = Callable[[Params, int, str], LR]
"""``lr_rule(extra, step, name)``: inner learning rate of parameter ``name`` at ``step``."""

StepParams = Callable[[Params, int], Params]
"""``step_params(extra, step)``: parameters that replace the model's at ``step`` (per-step BN)."""

StepBuffers = Callable[[int], Buffers]
"""``step_buffers(step)``: buffers (per-step running statistics) that replace the model's at ``step``."""


@dataclass(frozen=True)
class InnerSpec:
    """Static description of a learner's inner loop (everything but the tensors)."""

    steps: int
    order: int
    optimizer: optim.Optimizer
    adapt_names: tuple[str, ...]
    lr_rule: LRRule
    step_params: StepParams | None = None
    step_buffers: StepBuffers | None = None
    step_weights: tuple[float, ...] | None = None
    allow_unused: bool = False
    check_finite: bool = True
    fn_name: str = "metagrad"


class TaskHyper(NamedTuple):
    """The hyperparameters of a task problem (a pytree the engine differentiates leafwise)."""

    fixed: Params
    extra: Params
    buffers: Buffers


@dataclass(frozen=True, eq=False)
class TaskLoss:
    """``loss_fn(model(x; params at step k), y)``: the support and the query objective.

    Compared and hashed by identity: a learner keeps one, so compiled functions keyed on the
    problem are reused across meta-steps.
    """

    fm: FunctionalModel
    loss_fn: LossFn
    step_params: StepParams | None = None
    step_buffers: StepBuffers | None = None
    recorder: Recorder | None = None
    fn_name: str = "metagrad"

    def params_at(self, w: Params, h: TaskHyper, step: int) -> Params:
        """Every parameter the forward pass reads at ``step``: fixed, adapted, per-step."""
        full = {**h.fixed, **w}
        if self.step_params is not None:
            full.update(self.step_params(h.extra, step))
        return full

    def buffers_at(self, h: TaskHyper, step: int) -> Buffers:
        if self.step_buffers is None:
            return h.buffers
        return {**h.buffers, **self.step_buffers(step)}

    def __call__(self, w: Params, h: TaskHyper, batch: tuple[Tensor, Tensor], step: int) -> Tensor:
        x, y = batch
        pred = self.fm.forward(
            self.params_at(w, h, step),
            self.buffers_at(h, step),
            x,
            recorder=self.recorder,
            step=step,
        )
        _check_broadcast(self.fn_name, pred, y)
        out = self.loss_fn(pred, y)
        if not isinstance(out, Tensor) or out.dim() != 0:
            # Autograd's "grad can be implicitly created only for scalar outputs" does not say
            # that loss_fn is at fault; under vmap the shape seen here is the per-task one.
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{self.fn_name}: loss_fn must return a scalar tensor (the mean loss over one "
                f"task's examples), got {got}. Reduce it, e.g. reduction='mean' or .mean()."
            )
        return out


def _check_broadcast(fn_name: str, pred: Tensor, y: Tensor) -> None:
    """A float target that broadcasts against the output into a larger shape is a mistake.

    ``mse_loss`` of an output ``[K, 1]`` against a target ``[K]`` averages a ``K x K`` matrix
    of every pairing (torch only warns). Static shapes: cheap, and valid under ``vmap``.
    """
    if not (isinstance(pred, Tensor) and y.is_floating_point()) or pred.shape == y.shape:
        return
    try:
        both = torch.broadcast_shapes(pred.shape, y.shape)
    except RuntimeError:
        return  # not broadcastable: the loss function raises its own error
    if both != pred.shape and both != y.shape:
        raise ValueError(
            f"{fn_name}: the model's output has per-task shape {tuple(pred.shape)} but the "
            f"targets {tuple(y.shape)}; they broadcast to {tuple(both)}, so the loss would pair "
            f"every output with every target. Give targets the output's shape (e.g. "
            f"ys.unsqueeze(-1)) or reshape the output."
        )


@dataclass(frozen=True)
class _LRFromExtra:
    """``problem.lr``: the learner's rule read from the learned extras (hashable, stable)."""

    rule: LRRule

    def __call__(self, h: TaskHyper, step: int, name: str) -> LR:
        return self.rule(h.extra, step, name)


def task_problem(spec: InnerSpec, objective: TaskLoss) -> Problem:
    """The bilevel problem of one task of the meta-batch."""
    return Problem(
        inner=objective,
        outer=objective,
        optimizer=spec.optimizer,
        steps=spec.steps,
        order=spec.order,
        lr=_LRFromExtra(spec.lr_rule),
        outer_weights=spec.step_weights,
        stepwise=True,
        allow_unused=spec.allow_unused,
        allow_unused_hyper=True,  # a learned rate of an unused step simply has no gradient
        check_finite=spec.check_finite,
        name=spec.fn_name,
        unit="task",
        inner_name="support loss",
        outer_name="query loss",
    )


def split(
    spec: InnerSpec, theta: Params, extra: Params, buffers: Buffers
) -> tuple[Params, TaskHyper]:
    """``(w0, h)``: the adapted parameters and the rest."""
    w0 = {n: theta[n] for n in spec.adapt_names}
    fixed = {n: t for n, t in theta.items() if n not in w0}
    return w0, TaskHyper(fixed, extra, buffers)


def run_task(
    objective: TaskLoss,
    spec: InnerSpec,
    backend: GradBackend | None,
    theta: Params,
    extra: Params,
    buffers: Buffers,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor | None = None,
    yq: Tensor | None = None,
    task: int = 0,
) -> tuple[Tensor | None, Params]:
    """Adapt ``theta`` on one support set; return (query objective or None, every parameter).

    ``backend`` computes the inner gradients (default: autograd, ``create_graph`` at order 2;
    the graph drawing passes a recording one). The returned dict holds all parameters (adapted, fixed, per-step) as the forward pass after
    the last step reads them, plus the last step's per-step statistics when configured, so
    :meth:`Learner.predict` can use it directly.
    """
    problem = task_problem(spec, objective)
    if backend is None:
        backend = AutogradBackend(problem, task, create_graph=spec.order == 2)
    w0, h = split(spec, theta, extra, buffers)
    outer = None if xq is None or yq is None else (xq, yq)
    obj, w, _ = run(problem, backend, w0, h, {}, (xs, ys), outer)
    final = objective.params_at(w, h, spec.steps)
    if spec.step_buffers is not None:  # predict() then reads the statistics of the last step
        final.update(spec.step_buffers(spec.steps))
    return obj, final


@dataclass
class MetaResult:
    """Mean query objective over tasks and its gradient, keyed like ``learner.named_parameters()``.

    ``foreign`` pairs each closed-over tensor that reaches the meta-loss with its gradient.
    """

    loss: Tensor
    grads: dict[str, Tensor | None]
    per_task: Tensor
    foreign: list[tuple[Tensor, Tensor]]


#: ``auto`` runs the per-task loop instead of ``vmap`` from these sizes of one task on
#: (measured on MLPs, 1 CPU thread, BENCHMARKS.md "vmap or the loop"): adapted parameters
#: (per-task copies of more than ~0.4 MB spill the caches once batched) ...
VMAP_MAX_PARAMS = 100_000
#: ... or adapted parameters x (support + query) examples, a dense model's multiply-adds per
#: forward (the BLAS kernels are already full on one task; vmap's batched kernels then only
#: add traffic: separate bias adds, expanded copies).
VMAP_MAX_WORK = 10_000_000


def vmap_pays(w0: Params, xs: Tensor, xq: Tensor | None) -> bool:
    r"""Whether batching the tasks with ``vmap`` is expected to beat the per-task loop.

    With :math:`P` adapted parameter elements and :math:`N` support plus query examples per
    task, ``vmap`` pays when :math:`T > 1`, :math:`P < 10^5` and :math:`P N < 10^7`: below
    these the loop's per-operation dispatch, paid :math:`T` times, dominates; above them
    one task already fills the kernels. :math:`P N` counts a dense model's work; a weight-
    sharing model (convolutions, tokens) does more per parameter, so the rule keeps ``vmap``
    there, as before it existed.
    """
    if xs.shape[0] == 1:  # the loop's work plus the transforms' fixed cost
        return False
    p = sum(t.numel() for t in w0.values())
    rows = (xs.shape[1] if xs.dim() > 1 else 1) + (
        xq.shape[1] if xq is not None and xq.dim() > 1 else 0
    )
    return p < VMAP_MAX_PARAMS and p * rows < VMAP_MAX_WORK


def meta_gradient(
    objective: TaskLoss,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    strategy: str = "auto",
    need_grad: bool = True,
    compile: bool | str | Callable[..., Any] = False,
    cache: Cache | None = None,
    extra_names: dict[str, str] | None = None,
) -> MetaResult:
    """Mean query objective over the meta-batch and its exact gradient.

    Args:
        objective: the learner's :class:`TaskLoss`.
        spec: the inner loop.
        theta: the model's trainable parameters; extra: the learned extras.
        tasks: ``(xs, ys, xq, yq)`` with a leading task dimension.
        strategy: ``"auto"``, ``"loop"``, ``"vmap"``, ``"hvp_chain"`` or ``"checkpoint"``.
        extra_names: engine key of each extra -> its name in ``learner.named_parameters()``.

    Returns:
        :class:`MetaResult` with gradients keyed ``"module.<name>"`` for the model's parameters
        and by ``extra_names`` for the extras.
    """
    fm = objective.fm
    fm.sync_modes()
    xs, ys, xq, yq = tasks
    chosen = resolve_strategy(strategy, fm, spec.fn_name, spec.order, xs.device)
    w0, h = split(spec, theta, extra, fm.buffers())
    if strategy == "auto" and chosen == "vmap" and not compile and not vmap_pays(w0, xs, xq):
        chosen = "loop"
    if compile and chosen != "vmap":
        raise ValueError(
            f"{spec.fn_name}: compile=True needs the vmap strategy, but this model runs with "
            f"strategy={chosen!r} (norm layers, RNNs or custom layers). Use compile=False; "
            f"torch.compile measured no speed-up on the per-task loop of a conv+BN net."
        )
    problem = task_problem(spec, objective)
    try:
        res = hypergrad(
            problem,
            w0,
            h,
            (xs, ys),
            (xq, yq),
            # "auto" keeps the engine's fallback to the loop where vmap cannot run
            strategy="auto" if strategy == "auto" and chosen == "vmap" else _BILEVEL[chosen],
            # the adjoint strategies batch over tasks where the default would
            vmap_ok=chosen == "vmap"
            or (
                chosen in ("hvp_chain", "checkpoint")
                and resolve_strategy("auto", fm, spec.fn_name, spec.order, xs.device) == "vmap"
                and vmap_pays(w0, xs, xq)
            ),
            batched=True,
            need_grad=need_grad,
            compile=compile,
            cache=cache,
        )
    except (IndexError, RuntimeError) as err:
        better = explain_task_error(spec.fn_name, err, objective, theta, tasks)
        if better is None:
            raise
        raise better from err
    names = extra_names or {}
    grads: dict[str, Tensor | None] = {}
    if need_grad:
        g = res.grads
        for n in theta:
            grads[f"module.{n}"] = g.w0[n] if n in g.w0 else g.h.fixed[n]
        for k in extra:
            grads[names.get(k, k)] = g.h.extra[k]
    # Tensor hyperparameters of the inner optimizer (a learnable weight decay...) belong to no
    # learner parameter: they are delivered like closed-over tensors, never dropped.
    hyper = spec.optimizer.hyperparams()
    opt_pairs = [(hyper[k], gk) for k, gk in res.grads.opt.items() if gk is not None]
    return MetaResult(res.value, grads, res.per_problem, [*res.foreign, *opt_pairs])


def explain_task_error(
    fn_name: str,
    err: BaseException,
    objective: TaskLoss,
    theta: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
) -> Exception | None:
    """A clear error for the common data/model mismatches PyTorch reports in its own terms.

    Label ranges are checked against the model's real output (one forward pass of task 0's
    support set, run only after a failure), so an index error inside the user's model keeps its own message.
    """
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    xs, ys, _, yq = tasks
    if "shapes cannot be multiplied" in msg:
        return ValueError(
            f"{fn_name}: the model cannot take the inputs: per-example input shape "
            f"{tuple(xs.shape[2:])} ({msg}). Check that the data's feature size matches the "
            f"model's first layer."
        )
    if "must have the same dtype" in msg and not xs.is_floating_point():
        return TypeError(
            f"{fn_name}: xs/xq have dtype {xs.dtype} but the model computes in floating point "
            f"({msg}); cast the inputs with xs.float() (or .to(model dtype))."
        )
    if "expected target dtype to be Long" in msg or "expected scalar type Long" in msg:
        return TypeError(
            f"{fn_name}: loss_fn needs integer class labels but ys/yq have dtype {ys.dtype} "
            f"({msg}); pass labels as ys.long()."
        )
    if "numpy()" in msg and "requires grad" in msg:
        return RuntimeError(
            f"{fn_name}: the model or loss_fn converts a tensor to numpy, which autograd cannot "
            f"differentiate through ({msg}). Write that computation with torch operations."
        )
    if isinstance(err, IndexError) or "out of bounds" in msg:
        if ys.is_floating_point():
            return None
        try:  # the whole support set: one example would break BatchNorm1d in train mode
            with torch.no_grad():
                p = {k: v.detach() for k, v in theta.items()}
                out = objective.fm.forward(p, objective.fm.buffers(), xs[0])
        except Exception:  # the probe must never hide the original error
            return None
        classes = int(out.shape[-1])
        labels = torch.cat([ys.flatten(), yq.flatten()])
        labels = labels[labels != -100]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            return ValueError(
                f"{fn_name}: loss_fn raised {type(err).__name__} ({msg}): the labels range over "
                f"[{int(labels.min())}, {int(labels.max())}] but the model outputs {classes} "
                f"classes. Targets ys/yq must be integer labels in [0, number of classes) = "
                f"[0, {classes}); remap each task's labels to 0..N-1."
            )
    return None


def resolve_strategy(
    strategy: str,
    fm: FunctionalModel,
    fn_name: str,
    order: int = 2,
    device: torch.device | None = None,
) -> str:
    """The concrete strategy for ``strategy`` on this model; refuses a vmap that would be wrong.

    ``auto``: ``vmap`` for vmap-safe models, except conv nets that run channels-last (CPU),
    where the per-task NHWC loop is faster because vmap's batched convolutions run NCHW
    (BENCHMARKS.md). (:func:`meta_gradient` also runs a meta-batch of one task as the loop.)
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"{fn_name}: strategy={strategy!r} is not known; use one of {STRATEGIES} "
            f"('auto' picks vmap where it is exact and fast, else the per-task loop)."
        )
    if strategy == "auto":
        nhwc = fm.channels_last == "any" or (
            fm.channels_last == "cpu" and (device is None or device.type == "cpu")
        )
        return "vmap" if fm.vmap_safe() and not nhwc else "loop"
    if strategy == "vmap" and order == 2:
        bad = fm.vmap_wrong_second_order()
        if bad:
            raise ValueError(
                f"{fn_name}: strategy='vmap' with order=2 gives WRONG meta-gradients for this model: "
                f"the batched double backward of {bad} differs from the exact one (measured "
                f"relative error 1e-3 to 4e-2; cf. pytorch/functorch#534). Use strategy='auto' or "
                f"'loop' (exact), or 'hvp_chain' for many inner steps."
            )
    return strategy


def make_inner_optimizer(spec: object, fn_name: str) -> optim.Optimizer:
    """``"sgd" | "momentum" | "adam"``, a :mod:`metagrad.optim` optimizer, or a legacy one.

    The strings keep their meaning: ``"momentum"`` is heavy ball with 0.9; ``"adam"`` puts
    ``eps = 1e-8`` inside the square root (``eps_root``), so the update stays smooth where an
    inner gradient is exactly zero. The learner's ``inner_lr`` (or learned rates) replace the
    optimizer's own ``lr``.
    """
    from metagrad.functional import _optim as legacy

    if isinstance(spec, str):
        table: dict[str, optim.Optimizer] = {
            "sgd": optim.SGD(),
            "momentum": optim.SGD(momentum=0.9),
            "adam": optim.Adam(eps=0.0, eps_root=1e-8),
        }
        if spec not in table:
            raise ValueError(
                f"{fn_name}: inner_optimizer={spec!r} is not known; use 'sgd', 'momentum', 'adam' "
                f"or an optimizer such as metagrad.optim.Adam(eps=0.0, eps_root=1e-8)."
            )
        return table[spec]
    if isinstance(spec, legacy.SGD):
        return optim.SGD()
    if isinstance(spec, legacy.Momentum):
        return optim.SGD(momentum=spec.beta, nesterov=spec.nesterov)
    if isinstance(spec, legacy.Adam):
        return optim.Adam(betas=(spec.b1, spec.b2), eps=0.0, eps_root=spec.eps)
    if all(hasattr(spec, a) for a in ("init", "update", "hyperparams", "with_hyperparams")):
        return spec  # type: ignore[return-value]
    if hasattr(spec, "init") and hasattr(spec, "update"):
        warnings.warn(
            f"{fn_name}: inner_optimizer={spec!r} follows the old InnerOptimizer protocol "
            f"update(grads, state, params, lrs, step); it is adapted, but write it against "
            f"metagrad.optim's update(grads, state, params, step, lrs) protocol.",
            DeprecationWarning,
            stacklevel=3,
        )
        return _Legacy(spec)
    raise TypeError(
        f"{fn_name}: inner_optimizer={spec!r} has no init/update methods; pass 'sgd', "
        f"'momentum', 'adam' or a metagrad.optim optimizer such as metagrad.optim.SGD(momentum=0.9)."
    )


def refuse_learned_hyperparams(opt: optim.Optimizer, fn_name: str, why: str) -> None:
    """Raise if the inner optimizer holds tensor hyperparameters that require grad.

    For learners whose meta-gradient does not run through the optimizer's updates (``why``),
    such a tensor (a learnable weight decay) would silently keep ``.grad`` None.
    """
    hyper = opt.hyperparams() if hasattr(opt, "hyperparams") else {}
    learned = sorted(k for k, v in hyper.items() if isinstance(v, Tensor) and v.requires_grad)
    if learned:
        raise ValueError(
            f"{fn_name}: the inner optimizer's hyperparameters {learned} require grad, but {why}, "
            f"so they would get no gradient. Fix: pass plain numbers (or detached tensors), or "
            f"learn them with metagrad.MAML, which differentiates through the inner updates."
        )


def refuse_update_closure(
    opt: optim.Optimizer, params: Params, lr: float, fn_name: str, why: str
) -> None:
    """Raise if the inner optimizer's ``update`` closes over a tensor that requires grad (one
    not listed in ``hyperparams()``): probed once with one update of detached ``params`` and
    zero gradients at learning rate ``lr``, whose outputs then carry a graph.

    For learners whose meta-gradient does not run through the updates (``why``), such a tensor
    would silently keep ``.grad`` None.
    """
    w = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        zeros = {k: torch.zeros_like(v) for k, v in w.items()}
        new, _ = opt.update(zeros, opt.init(w), w, 0, {k: lr for k in w})
    refuse_closed_update(new, fn_name, why)


def refuse_closed_update(new: Params, fn_name: str, why: str) -> None:
    """Raise if ``new``, an inner update's output from detached inputs, requires grad: the
    update closes over a tensor that requires grad, which (``why``) gets no gradient."""
    if any(isinstance(v, Tensor) and v.requires_grad for v in new.values()):
        raise ValueError(
            f"{fn_name}: the inner optimizer's update depends on a tensor that requires grad (it "
            f"closes over one), but {why}, so that tensor would get no gradient. Fix: detach it, "
            f"or learn it with metagrad.MAML, which differentiates through the inner updates."
        )


@dataclass(frozen=True)
class _Legacy:
    """An optimizer written against the old ``update(grads, state, params, lrs, step)``."""

    inner: Any

    def init(self, params: Params) -> Any:
        return self.inner.init(params)

    def update(
        self, grads: Params, state: Any, params: Params, step: int, lrs: Any = None
    ) -> tuple[Params, Any]:
        lrs = lrs if lrs is not None else {k: 1.0 for k in params}
        out: tuple[Params, Any] = self.inner.update(grads, state, params, lrs, step)
        return out

    def hyperparams(self) -> dict[str, Tensor]:
        return {}

    def with_hyperparams(self, values: Any) -> _Legacy:
        return self
