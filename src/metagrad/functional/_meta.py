r"""Meta-batch strategies: exact meta-gradients over ``T`` tasks.

.. math::
    \mathcal{L}(\theta) = \frac{1}{T}\sum_{i=1}^{T} \mathcal{L}_i(\theta),\qquad
    g = \nabla_\theta \mathcal{L}(\theta)

* ``"loop"``: one task at a time with ``torch.autograd.grad(create_graph=True)``; each task's
  graph is freed right after its gradient is accumulated, so activation memory is that of one
  task, not ``T``. Works for every module (BatchNorm, LayerNorm, RNNs, custom code).
* ``"vmap"``: the whole meta-batch as one ``torch.func.grad(vmap(task))`` call. Several times
  faster on small models; used only where it is exact (see ``FunctionalModel.vmap_safe``).
* ``"hvp_chain"``: per task, exact second order by a backward chain of Hessian-vector products
  at stored iterates (``metagrad.functional._adjoint``): memory of one inner step instead of
  the whole unrolled loop, about one extra forward/backward per step.
* ``"checkpoint"``: as ``"hvp_chain"`` but storing only every ``ceil(sqrt(K))``-th iterate and
  recomputing the others segment by segment.
* ``"auto"`` (default): ``"vmap"`` when the model is vmap-safe, else ``"loop"``.

Both return the mean query objective and the gradient for every meta-parameter; the engine
then attaches that gradient to a loss tensor so ``loss.backward()`` delivers it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from metagrad._errors import NonFiniteError, check_finite, translate_autograd_error
from metagrad._typing import LossFn, Params
from metagrad.functional._adjoint import task_adjoint
from metagrad.functional._inner import AutogradBackend, FuncBackend, InnerSpec, run_task
from metagrad.functional._model import FunctionalModel

STRATEGIES = ("auto", "loop", "vmap", "hvp_chain", "checkpoint")


@dataclass
class MetaResult:
    """Mean query objective over tasks, and its gradient per meta-parameter (None if unused)."""

    loss: Tensor
    grads: dict[str, Tensor | None]
    per_task: Tensor


def _leaves(theta: Params, extra: Params) -> dict[str, Tensor]:
    return {
        **{f"theta:{k}": v for k, v in theta.items()},
        **{f"extra:{k}": v for k, v in extra.items()},
    }


@contextmanager
def _explain_autograd_errors(spec: InnerSpec) -> Iterator[None]:
    """Re-raise PyTorch's cryptic double-backward failures with an explanation and the fix."""
    try:
        yield
    except RuntimeError as err:
        better = translate_autograd_error(spec.fn_name, err, spec.order)
        if better is None:
            raise
        raise better from err


def _accumulate(total: dict[str, Tensor | None], key: str, g: Tensor | None) -> None:
    if g is not None:
        prev = total.get(key)
        total[key] = g if prev is None else prev + g


def _check_meta_grads(spec: InnerSpec, total: dict[str, Tensor | None]) -> None:
    for k, acc in total.items():
        if acc is not None:
            check_finite(spec.fn_name, acc, f"meta-gradient of {k.split(':', 1)[1]!r}", None, None)


def meta_loop(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    need_grad: bool,
) -> MetaResult:
    """Per-task loop with ``torch.autograd.grad``; memory of one task's graph at a time."""
    xs, ys, xq, yq = tasks
    T = xs.shape[0]
    leaves = _leaves(theta, extra)
    if not need_grad:
        # Inner gradients still need a graph; detach the meta-parameters so none is kept for them.
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in leaves.items()}
    th = {k[6:]: v for k, v in leaves.items() if k.startswith("theta:")}
    ex = {k[6:]: v for k, v in leaves.items() if k.startswith("extra:")}
    wrt = [k for k, v in leaves.items() if v.requires_grad]
    total: dict[str, Tensor | None] = {k: None for k in leaves}
    losses = []
    buffers = fm.buffers()
    for i in range(T):
        with _explain_autograd_errors(spec), torch.enable_grad():
            obj, _, _ = run_task(
                fm,
                loss_fn,
                spec,
                AutogradBackend(spec, i),
                th,
                ex,
                buffers,
                xs[i],
                ys[i],
                xq[i],
                yq[i],
            )
            assert obj is not None
            if spec.check_finite:
                check_finite(spec.fn_name, obj, "query loss", i, None)
            if need_grad and wrt:
                gs = torch.autograd.grad(obj / T, [leaves[k] for k in wrt], allow_unused=True)
                for k, g in zip(wrt, gs):
                    _accumulate(total, k, g)
        losses.append(obj.detach())
    per_task = torch.stack(losses)
    if spec.check_finite and need_grad:
        _check_meta_grads(spec, total)
    return MetaResult(per_task.mean(), total if need_grad else {}, per_task)


def meta_hvp_chain(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    need_grad: bool,
    every: int | None = None,
) -> MetaResult:
    """Per-task backward HVP chain: exact, without storing the inner loop's graph."""
    if not need_grad:
        return meta_loop(fm, loss_fn, spec, theta, extra, tasks, need_grad)
    xs, ys, xq, yq = tasks
    T = xs.shape[0]
    buffers = fm.buffers()
    total: dict[str, Tensor | None] = {}
    losses = []
    for i in range(T):
        with _explain_autograd_errors(spec):
            obj, gs = task_adjoint(
                fm, loss_fn, spec, theta, extra, buffers, xs[i], ys[i], xq[i], yq[i], i, every
            )
        losses.append(obj)
        for k, g in gs.items():
            total.setdefault(k, None)
            _accumulate(total, k, None if g is None else g / T)
    per_task = torch.stack(losses)
    if spec.check_finite:
        _check_meta_grads(spec, total)
    return MetaResult(per_task.mean(), total, per_task)


def _check_reaches_support(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Raise, as the loop does, when an adapted parameter does not reach the support loss.

    ``torch.func.grad`` silently returns zeros for such parameters, so without this probe
    (one first-order step of task 0 with autograd) the strategy would decide whether
    ``allow_unused=False`` is enforced.
    """
    if spec.allow_unused or spec.steps == 0:
        return
    probe = replace(spec, steps=1, order=1, step_weights=None, check_finite=False)
    th = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in theta.items()}
    ex = {k: v.detach() for k, v in extra.items()}
    with torch.enable_grad():
        run_task(
            fm,
            loss_fn,
            probe,
            AutogradBackend(probe, 0),
            th,
            ex,
            fm.buffers(),
            tasks[0][0],
            tasks[1][0],
        )


def _vmap_fn(
    fm: FunctionalModel, loss_fn: LossFn, spec: InnerSpec, need_grad: bool
) -> Callable[..., tuple[Params, Params, Tensor, Tensor, Tensor | None]]:
    """``(theta, extra, buffers, xs, ys, xq, yq) -> (g_theta, g_extra, loss, per_task, finite)``.

    ``finite`` holds one flag per output: ``per_task``, then each gradient in order. Computed
    inside the (compiled) function, where it fuses, instead of ~16 small ops after it; ``None``
    when ``spec.check_finite`` is off (nobody reads it).
    """
    backend = FuncBackend(spec)

    def one(
        th: Params, ex: Params, bufs: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> Tensor:
        obj, _, _ = run_task(fm, loss_fn, spec, backend, th, ex, bufs, xs, ys, xq, yq)
        assert obj is not None
        return obj

    batched = torch.func.vmap(one, in_dims=(None, None, None, 0, 0, 0, 0), randomness="different")

    def fn(
        th: Params, ex: Params, bufs: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> tuple[Params, Params, Tensor, Tensor, Tensor | None]:
        def mean_loss(t: Params, e: Params) -> tuple[Tensor, Tensor]:
            per_task = batched(t, e, bufs, xs, ys, xq, yq)
            return per_task.mean(), per_task.detach()

        g_th: Params = {}
        g_ex: Params = {}
        if need_grad:
            (g_th, g_ex), (loss, per_task) = torch.func.grad_and_value(
                mean_loss, argnums=(0, 1), has_aux=True
            )(th, ex)
        else:
            loss, per_task = mean_loss(th, ex)
        if not spec.check_finite:
            return g_th, g_ex, loss, per_task, None
        outs = [per_task, *g_th.values(), *g_ex.values()]
        finite = torch.stack([o.isfinite().all() for o in outs])
        return g_th, g_ex, loss, per_task, finite

    return fn


def meta_vmap(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    need_grad: bool,
    compile: bool | str = False,
) -> MetaResult:
    """All tasks at once: ``grad(mean(vmap(task)))``, exact for vmap-safe models.

    With ``compile`` (True: inductor, or a ``torch.compile`` backend name) the whole meta-gradient
    is compiled once per (inner-loop spec, loss, shapes) and cached on ``fm``: ~45 s to compile the
    sinusoid MLP here, then ~9x faster than eager, so it pays off only for long runs.
    """
    if (spec.adapt_names, spec.allow_unused) not in fm.reach_checked:
        _check_reaches_support(fm, loss_fn, spec, theta, extra, tasks)
        fm.reach_checked.add((spec.adapt_names, spec.allow_unused))
    buffers = fm.buffers()
    if compile and need_grad:
        key = (spec, id(loss_fn), compile)
        fn = fm.compiled.get(key)
        if fn is None:
            backend = "inductor" if compile is True else str(compile)
            fn = torch.compile(_vmap_fn(fm, loss_fn, spec, need_grad), backend=backend)
            fm.compiled[key] = fn
    else:
        fn = _vmap_fn(fm, loss_fn, spec, need_grad)
    th0 = {k: v.detach() for k, v in theta.items()}
    ex0 = {k: v.detach() for k, v in extra.items()}
    g_th, g_ex, loss, per_task, finite = fn(th0, ex0, buffers, *tasks)
    grads: dict[str, Tensor | None] = {}
    if need_grad:
        grads = {
            **{f"theta:{k}": (g if theta[k].requires_grad else None) for k, g in g_th.items()},
            **{f"extra:{k}": (g if extra[k].requires_grad else None) for k, g in g_ex.items()},
        }
    res = MetaResult(loss.detach(), grads, per_task)
    if finite is not None and not _flags_ok(
        finite, [True, *(g is not None for g in grads.values())]
    ):
        # vmap cannot branch on data: re-run per task to name the task and step.
        meta_loop(fm, loss_fn, spec, theta, extra, tasks, need_grad)
        raise NonFiniteError(spec.fn_name, "meta-gradient", None, None)
    return res


def resolve_strategy(
    strategy: str,
    fm: FunctionalModel,
    fn_name: str,
    order: int = 2,
    device: torch.device | None = None,
) -> str:
    """The concrete strategy for ``strategy`` on this model; refuses a vmap that would be wrong.

    ``auto``: ``vmap`` for vmap-safe models, except conv nets that run channels-last (CPU):
    there the per-task NHWC loop measured 2x faster than vmap (conv-4 without BatchNorm,
    8 tasks, one thread: 1.42 s vs 2.90 s), because vmap's batched convolutions run NCHW.
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


def meta_gradient(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    strategy: str = "auto",
    need_grad: bool = True,
    compile: bool | str = False,
) -> MetaResult:
    """Mean query objective over the meta-batch and its exact gradient (see module docstring).

    ``compile`` applies to the vmap strategy only (``torch.compile`` gave no speed-up on the
    compute-bound conv+BN loop).
    """
    fm.sync_modes()
    chosen = resolve_strategy(strategy, fm, spec.fn_name, spec.order, tasks[0].device)
    try:
        return _meta_gradient(fm, loss_fn, spec, theta, extra, tasks, chosen, need_grad, compile)
    except (IndexError, RuntimeError) as err:  # cross_entropy's "Target 7 is out of bounds"
        if isinstance(err, RuntimeError) and "out of bounds" not in str(err):
            raise  # (under vmap the same mistake surfaces as a RuntimeError)
        raise ValueError(
            f"{spec.fn_name}: loss_fn raised {type(err).__name__} ({str(err).splitlines()[0]}). "
            f"For classification the targets "
            f"ys/yq must be integer labels in [0, number of classes) of the model's output; "
            f"remap each task's labels to 0..N-1."
        ) from err


def _meta_gradient(
    fm: FunctionalModel,
    loss_fn: LossFn,
    spec: InnerSpec,
    theta: Params,
    extra: Params,
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    chosen: str,
    need_grad: bool,
    compile: bool | str,
) -> MetaResult:
    if chosen == "vmap":
        return meta_vmap(fm, loss_fn, spec, theta, extra, tasks, need_grad, compile)
    if compile:
        raise ValueError(
            f"{spec.fn_name}: compile=True needs the vmap strategy, but this model runs with "
            f"strategy={chosen!r} (norm layers, RNNs or custom layers). Use compile=False; "
            f"torch.compile measured no speed-up on the per-task loop of a conv+BN net."
        )

    def run(s: InnerSpec) -> MetaResult:
        if chosen == "loop":
            return meta_loop(fm, loss_fn, s, theta, extra, tasks, need_grad)
        every = None if chosen == "hvp_chain" else max(1, math.ceil(math.sqrt(s.steps)))
        return meta_hvp_chain(fm, loss_fn, s, theta, extra, tasks, need_grad, every)

    if not spec.check_finite:
        return run(spec)
    # Checking every inner gradient costs a device sync per tensor per step (~12% of a small
    # model's meta-step). NaN/Inf propagate to the result, so run unchecked, test the result
    # once, and only on failure re-run with per-step checks to name the task, step and tensor.
    res = run(replace(spec, check_finite=False))
    if _all_finite(res):
        return res
    run(spec)  # raises NonFiniteError naming task and step
    raise NonFiniteError(spec.fn_name, "meta-gradient", None, None)


def _flags_ok(finite: Tensor, keep: list[bool]) -> bool:
    """Whether the finiteness flags of the outputs that are returned (``keep``) all hold."""
    if all(keep):
        return bool(finite.all())
    return bool(finite[torch.tensor(keep, device=finite.device)].all())


def _all_finite(res: MetaResult) -> bool:
    parts = [res.per_task.isfinite().all()]
    parts += [g.isfinite().all() for g in res.grads.values() if g is not None]
    return bool(torch.stack(parts).all())


class AttachGrad(torch.autograd.Function):
    """``value`` as a tensor whose backward hands precomputed gradients to ``leaves``.

    Lets ``loss.backward()`` deliver a meta-gradient that was computed task by task (or under
    ``torch.func``) without keeping any task's graph alive.
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
