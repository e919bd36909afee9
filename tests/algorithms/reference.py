"""An independent reference for meta-gradients: a plain unrolled loop, one task at a time.

Written from the math only, with ``torch.func.functional_call`` and
``torch.autograd.grad(create_graph=True)``. It imports nothing from ``metagrad`` so that an
engine bug cannot hide in both implementations.

Inner step for an adapted parameter ``t`` with gradient ``g`` of the support loss at step ``k``
(learning rate ``a_k``):

* sgd:       ``t <- t - a_k g``
* momentum:  ``m <- beta m + g``; ``t <- t - a_k m`` (Nesterov: ``t <- t - a_k (g + beta m)``)
* adam:      ``m <- b1 m + (1-b1) g``; ``v <- b2 v + (1-b2) g^2``;
  ``t <- t - a_k mhat / sqrt(vhat + eps)`` with bias correction ``1 - b^(k+1)``.

First order: the inner gradients are constants (computed without a graph, then detached).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


def san(name: str) -> str:
    """``fc.weight`` -> ``fc__weight`` (the learner's key convention for learned tensors)."""
    return name.replace(".", "__")


def batch_statistics_copy(model: nn.Module) -> nn.Module:
    """Deep copy whose BatchNorm layers always normalize with the statistics of their input.

    ``track_running_stats=False`` with the running buffers removed makes ``F.batch_norm`` use
    batch statistics in train and eval mode alike and write nothing (the transductive policy).
    """
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return ref


def msl_weights_reference(steps: int, meta_step: int, anneal: int) -> tuple[float, ...]:
    """MAML++ multi-step loss weights (Antoniou et al. 2019, their ``get_per_step_loss_importance``).

    Uniform ``1/K`` at the start; each non-final weight loses ``(1/K)/anneal`` per meta-step down
    to ``0.03/K``; the final one gains ``(K-1)`` times that, up to ``1 - (K-1) 0.03/K``.
    """
    K = steps
    rate = 1.0 / K / anneal
    lo = 0.03 / K
    early = [max(1.0 / K - rate * meta_step, lo)] * (K - 1)
    last = min(1.0 / K + rate * meta_step * (K - 1), 1.0 - lo * (K - 1))
    return (*early, last)


@dataclass
class RefConfig:
    """Everything the reference needs besides tensors."""

    inner_lr: float = 0.1
    steps: int = 1
    order: int = 2
    optimizer: str = "sgd"  # "sgd" | "momentum" | "adam"
    beta: float = 0.9
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    lr_mode: str | None = None  # None | "per_param" | "per_step"
    adapt: tuple[str, ...] | None = None  # None: every trainable parameter
    weights: tuple[float, ...] | None = None  # multi-step loss weights (len == steps)
    norm_params: tuple[str, ...] = ()  # per-step normalization parameters (not adapted)
    allow_unused: bool = False


@dataclass
class Leaves:
    """The meta-parameters: model parameters, learned rates, per-step norm parameters."""

    theta: Params
    lrs: Params  # parameter name -> learned rate tensor
    norms: dict[int, Params]  # step -> {norm parameter name -> tensor}

    def named(self) -> dict[str, Tensor]:
        """Keyed like ``learner.named_parameters()``."""
        out = {f"module.{n}": t for n, t in self.theta.items()}
        out.update({f"inner_lrs.{san(n)}": t for n, t in self.lrs.items()})
        for k, d in self.norms.items():
            out.update({f"step_norm.s{k}__{san(n)}": t for n, t in d.items()})
        return out


def leaves_of(learner: nn.Module, cfg: RefConfig) -> Leaves:
    """Fresh leaf copies of a learner's meta-parameters (values only; no engine code is used)."""
    model = learner.module
    theta = {
        n: p.detach().clone().requires_grad_()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    lrs: Params = {}
    norms: dict[int, Params] = {}
    own = dict(learner.named_parameters())
    for n in theta:
        key = f"inner_lrs.{san(n)}"
        if key in own:
            lrs[n] = own[key].detach().clone().requires_grad_()
    for n in cfg.norm_params:
        k = 0
        while f"step_norm.s{k}__{san(n)}" in own:
            norms.setdefault(k, {})[n] = (
                own[f"step_norm.s{k}__{san(n)}"].detach().clone().requires_grad_()
            )
            k += 1
    return Leaves(theta, lrs, norms)


def _lr(cfg: RefConfig, leaves: Leaves, name: str, k: int) -> Tensor | float:
    if cfg.lr_mode is None:
        return cfg.inner_lr
    rate = leaves.lrs[name]
    if cfg.lr_mode == "per_param":
        return rate
    return rate[min(k, rate.shape[0] - 1)]


def adapt_task(
    net: nn.Module,
    loss_fn,
    cfg: RefConfig,
    leaves: Leaves,
    x: Tensor,
    y: Tensor,
    steps: int | None = None,
    query=None,
) -> tuple[Params, Tensor | None]:
    """Unrolled inner loop on one task; returns (full parameter dict, weighted query objective).

    ``query(params, k)`` (optional) evaluates the query loss with the parameters after step ``k``.
    """
    steps = cfg.steps if steps is None else steps
    theta = leaves.theta
    names = list(cfg.adapt) if cfg.adapt is not None else list(theta)
    names = [n for n in names if n not in cfg.norm_params]
    cur = {n: theta[n] for n in names}
    last = max(leaves.norms) if leaves.norms else 0

    def full(k: int) -> Params:
        p = {**theta, **cur}
        if cfg.norm_params:
            p.update(leaves.norms[min(k, last)])
        return p

    m = {n: torch.zeros_like(t) for n, t in cur.items()}
    v = {n: torch.zeros_like(t) for n, t in cur.items()}
    objective: Tensor | None = None
    for k in range(steps):
        loss = loss_fn(functional_call(net, full(k), (x,)), y)
        grads = torch.autograd.grad(
            loss,
            [cur[n] for n in names],
            create_graph=cfg.order == 2,
            allow_unused=cfg.allow_unused,
        )
        g = {n: torch.zeros_like(cur[n]) if gi is None else gi for n, gi in zip(names, grads)}
        if cfg.order == 1:
            g = {n: gi.detach() for n, gi in g.items()}
        new = {}
        for n in names:
            lr = _lr(cfg, leaves, n, k)
            if cfg.optimizer == "sgd":
                d = g[n]
            elif cfg.optimizer == "momentum":
                m[n] = cfg.beta * m[n] + g[n]
                d = g[n] + cfg.beta * m[n] if cfg.nesterov else m[n]
            elif cfg.optimizer == "adam":
                m[n] = cfg.b1 * m[n] + (1 - cfg.b1) * g[n]
                v[n] = cfg.b2 * v[n] + (1 - cfg.b2) * g[n] ** 2
                mh = m[n] / (1 - cfg.b1 ** (k + 1))
                vh = v[n] / (1 - cfg.b2 ** (k + 1))
                d = mh / torch.sqrt(vh + cfg.eps)
            else:
                raise AssertionError(cfg.optimizer)
            new[n] = cur[n] - lr * d
        cur = new
        if query is not None and cfg.weights is not None:
            term = cfg.weights[k] * query(full(k + 1))
            objective = term if objective is None else objective + term
    if query is not None and (cfg.weights is None or steps == 0):
        objective = query(full(steps))
    return full(steps), objective


def reference_meta_grad(
    learner: nn.Module,
    loss_fn,
    cfg: RefConfig,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """Mean query objective over tasks and its gradient, keyed like ``learner.named_parameters()``."""
    net = batch_statistics_copy(learner.module)
    leaves = leaves_of(learner, cfg)
    total = torch.zeros((), dtype=xs.dtype)
    T = xs.shape[0]
    for i in range(T):

        def query(p: Params, i: int = i) -> Tensor:
            return loss_fn(functional_call(net, p, (xq[i],)), yq[i])

        _, obj = adapt_task(net, loss_fn, cfg, leaves, xs[i], ys[i], query=query)
        assert obj is not None
        total = total + obj / T
    named = leaves.named()
    grads = torch.autograd.grad(total, list(named.values()), allow_unused=True)
    return total.detach(), dict(zip(named, grads))


def reference_reptile(
    model: nn.Module,
    loss_fn,
    inner_lr: float,
    steps: int,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
) -> tuple[Tensor, Params]:
    """Reptile with SGD: (mean query loss after adaptation, mean_i(theta - phi_i))."""
    net = batch_statistics_copy(model)
    theta = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    T = xs.shape[0]
    direction = {n: torch.zeros_like(t) for n, t in theta.items()}
    losses = []
    for i in range(T):
        phi = dict(theta)
        for _ in range(steps):
            cur = {n: t.clone().requires_grad_() for n, t in phi.items()}
            loss = loss_fn(functional_call(net, cur, (xs[i],)), ys[i])
            grads = torch.autograd.grad(loss, list(cur.values()))
            phi = {n: (cur[n] - inner_lr * g).detach() for n, g in zip(cur, grads)}
        with torch.no_grad():
            losses.append(loss_fn(functional_call(net, phi, (xq[i],)), yq[i]))
        for n in theta:
            direction[n] += (theta[n] - phi[n]) / T
    return torch.stack(losses).mean(), direction
