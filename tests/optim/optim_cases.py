"""A small fixed problem and the optimizer configurations the optim tests share.

The problem is a two-layer logistic regression with an L2 term, float64, parameters named like
an ``nn.Module``'s (``layer1.weight``, ``head.bias``) so module-prefix groups apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import metagrad.optim as mo

DTYPE = torch.float64

_gen = torch.Generator().manual_seed(1234)
X = torch.randn(8, 3, generator=_gen, dtype=DTYPE)
Y = torch.sign(torch.randn(8, generator=_gen, dtype=DTYPE))
INIT = {
    "layer1.weight": 0.7 * torch.randn(5, 3, generator=_gen, dtype=DTYPE),
    "layer1.bias": 0.3 * torch.randn(5, generator=_gen, dtype=DTYPE),
    "head.weight": 0.7 * torch.randn(1, 5, generator=_gen, dtype=DTYPE),
    "head.bias": 0.1 * torch.randn(1, generator=_gen, dtype=DTYPE),
}


def init_params() -> dict[str, Tensor]:
    """Fresh copies of the initial parameters."""
    return {k: v.clone() for k, v in INIT.items()}


def loss(params: dict[str, Tensor]) -> Tensor:
    """Mean logistic loss of a tanh MLP plus a small L2 term."""
    h = torch.tanh(X @ params["layer1.weight"].T + params["layer1.bias"])
    z = (h @ params["head.weight"].T + params["head.bias"]).squeeze(-1)
    l2 = sum((p * p).sum() for p in params.values())
    return torch.nn.functional.softplus(-Y * z).mean() + 0.05 * l2


def grads_at(params: dict[str, Tensor], create_graph: bool = False) -> dict[str, Tensor]:
    """Gradient of :func:`loss` at ``params`` (differentiable when ``create_graph``)."""
    if not create_graph:
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    g = torch.autograd.grad(loss(params), list(params.values()), create_graph=create_graph)
    return dict(zip(params, g))


def func_grads(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same gradient through ``torch.func.grad`` (composes with vmap/jvp)."""
    out: dict[str, Tensor] = torch.func.grad(loss)(params)
    return out


# (optimizer class name, kwargs shared by both libraries, overrides for the "layer1" group)
Case = tuple[str, dict[str, Any], dict[str, Any] | None]

CASES: list[Case] = [
    ("SGD", {}, None),
    ("SGD", {"lr": 0.1, "weight_decay": 0.1}, None),
    ("SGD", {"lr": 0.1, "momentum": 0.9}, None),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, None),
    ("SGD", {"lr": 0.1, "momentum": 0.8, "dampening": 0.3}, None),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "maximize": True}, None),
    (
        "SGD",
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1, "nesterov": True},
    ),
    ("Adam", {}, None),
    ("Adam", {"lr": 0.05, "weight_decay": 0.1}, None),
    ("Adam", {"lr": 0.05, "amsgrad": True}, None),
    ("Adam", {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "maximize": True}, None),
    (
        "Adam",
        {"lr": 0.05},
        {"lr": 0.01, "betas": (0.5, 0.9), "amsgrad": True, "weight_decay": 0.1, "eps": 1e-3},
    ),
    ("AdamW", {}, None),
    ("AdamW", {"lr": 0.05, "weight_decay": 0.5}, None),
    ("AdamW", {"lr": 0.05, "amsgrad": True}, None),
    ("AdamW", {"lr": 0.05, "maximize": True}, None),
    ("AdamW", {"lr": 0.05}, {"lr": 0.02, "weight_decay": 0.3, "betas": (0.7, 0.95)}),
    ("RMSprop", {}, None),
    ("RMSprop", {"lr": 0.01, "weight_decay": 0.1}, None),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9}, None),
    ("RMSprop", {"lr": 0.01, "centered": True}, None),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5, "alpha": 0.9}, None),
    ("RMSprop", {"lr": 0.01, "maximize": True}, None),
    ("RMSprop", {"lr": 0.01}, {"lr": 0.005, "alpha": 0.8, "centered": True, "momentum": 0.3}),
    ("Adagrad", {}, None),
    ("Adagrad", {"lr": 0.1, "weight_decay": 0.1}, None),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.1}, None),
    ("Adagrad", {"lr": 0.1, "initial_accumulator_value": 0.5}, None),
    ("Adagrad", {"lr": 0.1, "maximize": True}, None),
    ("Adagrad", {"lr": 0.1}, {"lr": 0.2, "lr_decay": 0.05, "eps": 1e-3}),
    ("Adadelta", {}, None),
    ("Adadelta", {"rho": 0.5, "weight_decay": 0.1}, None),
    ("Adadelta", {"maximize": True}, None),
    ("Adadelta", {"lr": 0.5}, {"lr": 2.0, "rho": 0.7, "eps": 1e-4}),
    ("Adamax", {}, None),
    ("Adamax", {"lr": 0.05, "weight_decay": 0.1}, None),
    ("Adamax", {"lr": 0.05, "maximize": True}, None),
    ("Adamax", {"lr": 0.05}, {"lr": 0.01, "betas": (0.5, 0.9), "eps": 1e-3}),
    ("ASGD", {}, None),
    ("ASGD", {"lr": 0.1, "lambd": 0.1, "alpha": 0.5, "t0": 5.0}, None),
    ("ASGD", {"lr": 0.1, "weight_decay": 0.1}, None),
    ("ASGD", {"lr": 0.1, "maximize": True}, None),
    ("ASGD", {"lr": 0.1, "t0": 3.0}, {"lr": 0.05, "lambd": 0.01, "t0": 8.0}),
    ("Rprop", {}, None),
    ("Rprop", {"lr": 0.1, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.2)}, None),
    ("Rprop", {"lr": 0.05, "maximize": True}, None),
    ("Rprop", {"lr": 0.05}, {"lr": 0.2, "etas": (0.4, 1.1)}),
]

OPTIMIZERS = sorted({name for name, _, _ in CASES})


def case_id(case: Case) -> str:
    """A readable pytest id such as ``Adam-lr=0.05,amsgrad=True+group``."""
    name, kw, group = case
    body = ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
    return f"{name}-{body}" + ("+group" if group else "")


def make_metagrad(case: Case) -> mo.Optimizer:
    """The metagrad optimizer of a case (the group selects the ``layer1`` module)."""
    name, kw, group = case
    groups = (mo.Group("layer1", **group),) if group else ()
    opt: mo.Optimizer = getattr(mo, name)(**kw, groups=groups)
    return opt


def make_torch(case: Case, tensors: dict[str, Tensor]) -> torch.optim.Optimizer:
    """The torch optimizer of a case over ``tensors`` (two param groups when grouped)."""
    name, kw, group = case
    cls: Callable[..., torch.optim.Optimizer] = getattr(torch.optim, name)
    if group is None:
        return cls(list(tensors.values()), **kw)
    layer1 = [t for k, t in tensors.items() if k.startswith("layer1.")]
    rest = [t for k, t in tensors.items() if not k.startswith("layer1.")]
    return cls([{"params": layer1, **group}, {"params": rest}], **kw)


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` (absolute when ``b`` is zero)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
