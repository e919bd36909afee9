"""Meta-step and derivative implementations compared by ``bench_meta.py``.

Each meta-step factory takes ``(model, workload)`` (``model`` is that implementation's own copy)
and returns ``step(tasks)``, which computes ONE meta-gradient for all parameters from the task
tensors ``(xs, ys, xq, yq)`` and returns it as ``{parameter name: tensor}``. All implementations use plain SGD in the inner loop
and the mean over tasks of the query loss as the meta-objective.

Peers are written from their libraries' documented APIs (higher, torchopt) or from plain PyTorch;
the learn2learn-style loop reproduces learn2learn's clone-then-update pattern without the package
(it does not install on Python 3.11).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from _workloads import DerivProblem, DerivWorkload, MetaWorkload

Grads = dict[str, Tensor]
Tasks = tuple[Tensor, ...]


@dataclass
class Impl:
    """One row of a result table."""

    name: str
    is_metagrad: bool
    order: int  # 1 or 2 (meta-steps); 2 for derivative workloads
    factory: Callable[..., Callable[..., Tensor | Grads]] | None
    unavailable: str | None = None  # reason, if the package cannot be used
    note: str = ""
    reference: bool = False  # the gate compares every same-order row against this one
    images_only: bool = False  # only on image (4-D input) workloads


def _optional(name: str) -> tuple[object | None, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as err:  # any failure to import means "unavailable"
        return None, f"unavailable: {type(err).__name__}: {err}".splitlines()[0][:200]


higher, HIGHER_ERR = _optional("higher")
torchopt, TORCHOPT_ERR = _optional("torchopt")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _grads_of(model: nn.Module) -> Grads:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _zero(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _summed_query_step(
    model: nn.Module, task_loss: Callable[[Grads, Tensor, Tensor, Tensor, Tensor], Tensor]
) -> Callable[[Tasks], Grads]:
    """The meta-step of the peers that sum the tasks' query losses and call backward once.

    ``task_loss(theta, xs_i, ys_i, xq_i, yq_i)`` adapts to task ``i`` and returns its query loss
    (``theta``: the model's parameters by name).
    """

    def step(tasks: Tasks) -> Grads:
        xs, ys, xq, yq = tasks
        T = xs.shape[0]
        _zero(model)
        theta = dict(model.named_parameters())
        total = 0.0
        for i in range(T):
            total = total + task_loss(theta, xs[i], ys[i], xq[i], yq[i])
        (total / T).backward()
        return _grads_of(model)

    return step


# --------------------------------------------------------------------------------------------
# (a) plain per-task loop: functional_call + autograd.grad(create_graph=True), one backward
# --------------------------------------------------------------------------------------------
def _same(x: Tensor) -> Tensor:
    return x


def plain_loop(
    model: nn.Module,
    wl: MetaWorkload,
    order: int = 2,
    prep: Callable[[Tensor], Tensor] | None = None,
):
    loss_fn, lr, steps = wl.loss_fn, wl.inner_lr, wl.steps
    create = order == 2
    if prep is None:
        prep = _same

    def task_loss(theta: Grads, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor) -> Tensor:
        fast = theta
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (prep(x_s),)), y_s)
            gs = torch.autograd.grad(loss, list(fast.values()), create_graph=create)
            fast = {k: w - lr * g for (k, w), g in zip(fast.items(), gs)}
        return loss_fn(functional_call(model, fast, (prep(x_q),)), y_q)

    return _summed_query_step(model, task_loss)


def plain_loop_fo(model: nn.Module, wl: MetaWorkload):
    return plain_loop(model, wl, order=1)


def _nhwc(x: Tensor) -> Tensor:
    """The image batch with explicit NHWC strides (C = 1 batches keep NCHW ones otherwise)."""
    _, c, h, w = x.shape
    return x.contiguous(memory_format=torch.channels_last).as_strided(
        x.shape, (h * w * c, 1, w * c, c)
    )


def plain_loop_nhwc(model: nn.Module, wl: MetaWorkload):
    """The plain loop hand-tuned with channels-last image batches (what metagrad does itself)."""
    return plain_loop(model, wl, prep=_nhwc)


# --------------------------------------------------------------------------------------------
# (b) higher.innerloop_ctx, per-task backward as in higher's MAML example
# --------------------------------------------------------------------------------------------
def higher_loop(model: nn.Module, wl: MetaWorkload):
    assert higher is not None
    inner_opt = torch.optim.SGD(model.parameters(), lr=wl.inner_lr)

    def step(tasks: Tasks) -> Grads:
        xs, ys, xq, yq = tasks
        T = xs.shape[0]
        _zero(model)
        for i in range(T):
            with higher.innerloop_ctx(  # type: ignore[attr-defined]
                model, inner_opt, copy_initial_weights=False, track_higher_grads=True
            ) as (fmodel, diffopt):
                for _ in range(wl.steps):
                    diffopt.step(wl.loss_fn(fmodel(xs[i]), ys[i]))
                (wl.loss_fn(fmodel(xq[i]), yq[i]) / T).backward()
        return _grads_of(model)

    return step


# --------------------------------------------------------------------------------------------
# (c) torchopt: stateful MetaSGD (in-place on the module, state restored per task) and the
#     functional FuncOptimizer(torchopt.sgd) on a parameter dict
# --------------------------------------------------------------------------------------------
def torchopt_metasgd(model: nn.Module, wl: MetaWorkload):
    assert torchopt is not None
    to = torchopt
    inner_opt = to.MetaSGD(model, lr=wl.inner_lr)  # type: ignore[attr-defined]
    net_state = to.extract_state_dict(model, by="reference", detach_buffers=True)  # type: ignore[attr-defined]
    opt_state = to.extract_state_dict(inner_opt, by="reference")  # type: ignore[attr-defined]

    def step(tasks: Tasks) -> Grads:
        xs, ys, xq, yq = tasks
        T = xs.shape[0]
        _zero(model)
        for i in range(T):
            for _ in range(wl.steps):
                inner_opt.step(wl.loss_fn(model(xs[i]), ys[i]))
            (wl.loss_fn(model(xq[i]), yq[i]) / T).backward()
            to.recover_state_dict(model, net_state)  # type: ignore[attr-defined]
            to.recover_state_dict(inner_opt, opt_state)  # type: ignore[attr-defined]
        return _grads_of(model)

    return step


def torchopt_func(model: nn.Module, wl: MetaWorkload):
    assert torchopt is not None
    to = torchopt

    def task_loss(theta: Grads, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor) -> Tensor:
        opt = to.FuncOptimizer(to.sgd(lr=wl.inner_lr))  # type: ignore[attr-defined]
        fast = theta
        for _ in range(wl.steps):
            loss = wl.loss_fn(functional_call(model, fast, (x_s,)), y_s)
            fast = opt.step(loss, fast)
        return wl.loss_fn(functional_call(model, fast, (x_q,)), y_q)

    return _summed_query_step(model, task_loss)


# --------------------------------------------------------------------------------------------
# (d) learn2learn-style loop: clone the module with non-leaf parameter clones, update the
#     clone's parameters functionally (p - lr * g, create_graph=True), call the clone
# --------------------------------------------------------------------------------------------
def _clone_module(module: nn.Module) -> nn.Module:
    """Shallow structural copy whose parameters are ``p.clone()`` (still on the graph of ``p``)."""
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = module.__dict__.copy()
    new._parameters = {k: (None if p is None else p.clone()) for k, p in module._parameters.items()}
    new._buffers = dict(module._buffers)
    new._modules = {
        k: (None if m is None else _clone_module(m)) for k, m in module._modules.items()
    }
    return new


def _update_module(module: nn.Module, updates: dict[str, Tensor]) -> None:
    """Replace each parameter tensor by its update (a non-leaf tensor) in place in the clone."""
    for qual, new in updates.items():
        owner = module
        *path, leaf = qual.split(".")
        for part in path:
            owner = owner._modules[part]  # type: ignore[assignment]
        owner._parameters[leaf] = new  # type: ignore[assignment]


def l2l_style(model: nn.Module, wl: MetaWorkload):
    def task_loss(theta: Grads, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor) -> Tensor:
        learner = _clone_module(model)
        for _ in range(wl.steps):
            named = list(learner.named_parameters())
            loss = wl.loss_fn(learner(x_s), y_s)
            gs = torch.autograd.grad(loss, [p for _, p in named], create_graph=True)
            _update_module(learner, {n: p - wl.inner_lr * g for (n, p), g in zip(named, gs)})
        return wl.loss_fn(learner(x_q), y_q)

    return _summed_query_step(model, task_loss)


# --------------------------------------------------------------------------------------------
# (e) hand-written torch.func: grad of mean(vmap(task)), task = inner torch.func.grad steps
# --------------------------------------------------------------------------------------------
def func_vmap(model: nn.Module, wl: MetaWorkload, order: int = 2):
    loss_fn, lr, steps = wl.loss_fn, wl.inner_lr, wl.steps

    def task_loss(params: Grads, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor) -> Tensor:
        def support(p: Grads) -> Tensor:
            return loss_fn(functional_call(model, p, (x_s,)), y_s)

        for _ in range(steps):
            g = torch.func.grad(support)(params)
            if order == 1:  # first order: the inner gradient is a constant
                g = {k: v.detach() for k, v in g.items()}
            params = {k: params[k] - lr * g[k] for k in params}
        return loss_fn(functional_call(model, params, (x_q,)), y_q)

    def meta_loss(params: Grads, *tasks: Tensor) -> Tensor:
        per_task = torch.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *tasks)
        return per_task.mean()

    def step(tasks: Tasks) -> Grads:
        theta = {k: v.detach() for k, v in model.named_parameters()}
        return torch.func.grad(meta_loss)(theta, *tasks)

    return step


def func_vmap_fo(model: nn.Module, wl: MetaWorkload):
    return func_vmap(model, wl, order=1)


# --------------------------------------------------------------------------------------------
# (f) metagrad
# --------------------------------------------------------------------------------------------
def metagrad_factory(strategy: str, order: int = 2, memory_format: str = "auto"):
    def make(model: nn.Module, wl: MetaWorkload):
        from metagrad.algorithms import MAML

        learner = MAML(
            model,
            wl.loss_fn,
            wl.inner_lr,
            wl.steps,
            order=order,
            strategy=strategy,
            memory_format=memory_format,
        )

        def step(tasks: Tasks) -> Grads:
            g = learner.meta_grad(*tasks)
            return {k.removeprefix("module."): v for k, v in g.items() if v is not None}

        return step

    return make


def meta_impls() -> list[Impl]:
    """Every meta-step row, in table order. Rows of order 1 are gated against the FO reference."""
    return [
        Impl("plain loop (functional_call + autograd.grad)", False, 2, plain_loop, reference=True),
        Impl(
            "higher.innerloop_ctx",
            False,
            2,
            higher_loop,
            HIGHER_ERR,
            note="copy_initial_weights=False, track_higher_grads=True, backward per task",
        ),
        Impl(
            "torchopt.MetaSGD",
            False,
            2,
            torchopt_metasgd,
            TORCHOPT_ERR,
            note="stateful; extract/recover_state_dict per task",
        ),
        Impl(
            "torchopt.FuncOptimizer(sgd)",
            False,
            2,
            torchopt_func,
            TORCHOPT_ERR,
            note="functional, on a parameter dict",
        ),
        Impl(
            "l2l-style loop",
            False,
            2,
            l2l_style,
            note="learn2learn itself does not install on Python 3.11",
        ),
        Impl("hand-written torch.func vmap", False, 2, func_vmap),
        Impl(
            "plain loop, hand-tuned NHWC input",
            False,
            2,
            plain_loop_nhwc,
            note="the layout metagrad picks by default, applied by hand",
            images_only=True,
        ),
        Impl(
            "metagrad memory_format=preserve (NCHW)",
            True,
            2,
            metagrad_factory("auto", memory_format="preserve"),
            images_only=True,
        ),
        Impl("metagrad strategy=loop", True, 2, metagrad_factory("loop")),
        Impl("metagrad strategy=vmap", True, 2, metagrad_factory("vmap")),
        Impl("metagrad strategy=auto", True, 2, metagrad_factory("auto")),
        # the constant-memory strategies (issue: at most 1.3x the default's time)
        Impl("metagrad strategy=hvp_chain", True, 2, metagrad_factory("hvp_chain")),
        Impl("metagrad strategy=checkpoint", True, 2, metagrad_factory("checkpoint")),
        Impl(
            "plain loop, first order",
            False,
            1,
            plain_loop_fo,
            reference=True,
            note="inner gradients without create_graph",
        ),
        Impl("hand-written torch.func vmap, first order", False, 1, func_vmap_fo),
        Impl("metagrad order=1 (auto)", True, 1, metagrad_factory("auto", order=1)),
    ]


# --------------------------------------------------------------------------------------------
# HVP and Hessian of f(flat parameters)
# --------------------------------------------------------------------------------------------
def _hvp_autograd_functional(pb: DerivProblem):
    return lambda: torch.autograd.functional.hvp(pb.f, pb.x, pb.v)[1]


def _hvp_double_backward(pb: DerivProblem):
    def run() -> Tensor:
        xx = pb.x.detach().requires_grad_()
        (g,) = torch.autograd.grad(pb.f(xx), xx, create_graph=True)
        (hv,) = torch.autograd.grad(g, xx, pb.v)
        return hv

    return run


def _hvp_func_fwd(manual_mse: bool):
    def make(pb: DerivProblem):
        grad_f = torch.func.grad(pb.f_manual_mse if manual_mse else pb.f)
        return lambda: torch.func.jvp(grad_f, (pb.x,), (pb.v,))[1]

    return make


def _hvp_func_rev(pb: DerivProblem):
    grad_f = torch.func.grad(pb.f)
    return lambda: torch.func.vjp(grad_f, pb.x)[1](pb.v)[0]


def _hvp_metagrad(mode: str):
    def make(pb: DerivProblem):
        from metagrad.derivatives import hvp

        return lambda: hvp(pb.f, pb.x, pb.v, mode=mode)

    return make


def _hess_autograd_functional(vectorize: bool):
    def make(pb: DerivProblem):
        return lambda: torch.autograd.functional.hessian(pb.f, pb.x, vectorize=vectorize)

    return make


def _hess_func(pb: DerivProblem):
    h = torch.func.hessian(pb.f)
    return lambda: h(pb.x)


def _hess_func_rev_rev(pb: DerivProblem):
    h = torch.func.jacrev(torch.func.jacrev(pb.f))
    return lambda: h(pb.x)


def _hess_metagrad(pb: DerivProblem):
    from metagrad.derivatives import hessian

    return lambda: hessian(pb.f, pb.x)


def deriv_impls(wl: DerivWorkload) -> list[Impl]:
    if wl.kind == "hvp":
        return [
            Impl(
                "torch.autograd.functional.hvp",
                False,
                2,
                _hvp_autograd_functional,
                reference=True,
            ),
            Impl("autograd.grad double backward", False, 2, _hvp_double_backward),
            Impl("torch.func jvp(grad(f)) (fwd-over-rev)", False, 2, _hvp_func_fwd(False)),
            Impl(
                "torch.func jvp(grad(f)), MSE as pow(2).mean()",
                False,
                2,
                _hvp_func_fwd(True),
                note="same function; works around F.mse_loss's forward-over-reverse failure",
            ),
            Impl("torch.func vjp(grad(f)) (rev-over-rev)", False, 2, _hvp_func_rev),
            Impl('metagrad hvp mode="rev"', True, 2, _hvp_metagrad("rev")),
            Impl('metagrad hvp mode="fwd"', True, 2, _hvp_metagrad("fwd")),
        ]
    return [
        Impl(
            "torch.autograd.functional.hessian",
            False,
            2,
            _hess_autograd_functional(False),
            reference=True,
        ),
        Impl(
            "torch.autograd.functional.hessian(vectorize=True)",
            False,
            2,
            _hess_autograd_functional(True),
        ),
        Impl("torch.func.hessian (jacfwd(jacrev))", False, 2, _hess_func),
        Impl("torch.func jacrev(jacrev)", False, 2, _hess_func_rev_rev),
        Impl("metagrad hessian", True, 2, _hess_metagrad),
    ]
