"""Derivatives through 5 optimizer steps with respect to tensor hyperparameters.

Autograd (``create_graph=True`` through the inner gradients, so the Hessian path is included)
against central finite differences, float64, global relative error over the whole gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from optim_cases import DTYPE, grads_at, init_params
from torch import Tensor
from torch.utils._pytree import tree_flatten

import metagrad.optim as mo

STEPS = 5
TOL = 1e-6


def T(value: Any) -> Tensor:
    """A differentiable float64 hyperparameter."""
    return torch.tensor(value, dtype=DTYPE, requires_grad=True)


def _weights(leaves: list[Tensor]) -> list[Tensor]:
    # Fixed, sign-varying weights so that no derivative cancels by symmetry.
    return [torch.sin(torch.arange(t.numel(), dtype=DTYPE) + 1.7 * i).reshape(t.shape)
            for i, t in enumerate(leaves)]  # fmt: skip


def objective(
    opt: mo.Optimizer, differentiable: bool, lrs: Mapping[str, Tensor] | None = None
) -> Tensor:
    """A weighted sum of the parameters and the optimizer state after ``STEPS`` updates."""
    params = {k: v.requires_grad_(differentiable) for k, v in init_params().items()}
    state = opt.init(params)
    for step in range(STEPS):
        grads = grads_at(params, create_graph=differentiable)
        params, state = opt.update(grads, state, params, step, lrs)
    leaves = tree_flatten((params, state))[0]
    return sum((w * t).sum() for w, t in zip(_weights(leaves), leaves))  # type: ignore[return-value]


def finite_difference(fn: Any, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Central differences of the scalar ``fn(values)`` in every element of every value."""
    out = {}
    for key, value in values.items():
        flat = value.detach().reshape(-1)
        grad = torch.zeros_like(flat)
        for i in range(flat.numel()):
            h = 1e-6 * max(abs(flat[i].item()), 1e-2)
            plus, minus = flat.clone(), flat.clone()
            plus[i] += h
            minus[i] -= h
            vp = {**{k: v.detach() for k, v in values.items()}, key: plus.reshape(value.shape)}
            vm = {**{k: v.detach() for k, v in values.items()}, key: minus.reshape(value.shape)}
            grad[i] = (fn(vp) - fn(vm)) / (2 * h)
        out[key] = grad.reshape(value.shape)
    return out


def global_rel_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    va = torch.cat([a[k].reshape(-1) for k in b])
    vb = torch.cat([b[k].reshape(-1) for k in b])
    return ((va - vb).norm() / vb.norm()).item()


def hyper_cases() -> list[tuple[str, mo.Optimizer]]:
    """Optimizers whose hyperparameters are all differentiable tensors."""
    return [
        ("SGD", mo.SGD(lr=T(0.1), momentum=T(0.8), dampening=T(0.2), weight_decay=T(0.05))),
        ("SGD-nesterov", mo.SGD(lr=T(0.1), momentum=T(0.7), weight_decay=T(0.05), nesterov=True)),
        (
            "SGD-groups",
            mo.SGD(lr=T(0.1), momentum=0.9, groups=(mo.Group("layer1", lr=T(0.05), weight_decay=T(0.1)),)),
        ),
        (
            "Adam",
            mo.Adam(lr=T(0.05), betas=(T(0.8), T(0.95)), eps=T(1e-3), weight_decay=T(0.05), eps_root=T(1e-4)),
        ),
        ("Adam-amsgrad", mo.Adam(lr=T(0.05), betas=(T(0.8), T(0.95)), eps=T(1e-4), amsgrad=True)),
        ("AdamW", mo.AdamW(lr=T(0.05), betas=(T(0.8), T(0.95)), eps=T(1e-3), weight_decay=T(0.3))),
        (
            "RMSprop-centered",
            mo.RMSprop(lr=T(0.01), alpha=T(0.9), eps=T(1e-3), weight_decay=T(0.05), momentum=T(0.5), centered=True),
        ),
        ("RMSprop", mo.RMSprop(lr=T(0.01), alpha=T(0.9), eps=T(1e-3), momentum=T(0.5))),
        (
            "Adagrad",
            mo.Adagrad(lr=T(0.1), lr_decay=T(0.1), weight_decay=T(0.05), initial_accumulator_value=T(0.2), eps=T(1e-3)),
        ),
        ("Adadelta", mo.Adadelta(lr=T(1.0), rho=T(0.8), eps=T(1e-3), weight_decay=T(0.05))),
        ("Adamax", mo.Adamax(lr=T(0.05), betas=(T(0.8), T(0.95)), eps=T(1e-3), weight_decay=T(0.05))),
        ("ASGD", mo.ASGD(lr=T(0.1), lambd=T(0.1), alpha=T(0.6), t0=T(1.5), weight_decay=T(0.05))),
        ("Rprop", mo.Rprop(lr=T(0.05), etas=(T(0.4), T(1.3)), step_sizes=(T(0.01), T(0.06)))),
        (
            "SGD-per-element-wd",
            mo.SGD(lr=0.1, momentum=0.9, groups=(mo.Group("layer1.weight", weight_decay=T(torch.rand(5, 3).tolist())),)),
        ),
        (
            "Adam-per-element-wd",
            mo.Adam(lr=0.05, groups=(mo.Group("head.weight", weight_decay=T(torch.rand(1, 5).tolist()), betas=(0.8, T(0.9))),)),
        ),
    ]  # fmt: skip


@pytest.mark.parametrize("name, opt", hyper_cases(), ids=[n for n, _ in hyper_cases()])
def test_hypergradient_matches_finite_differences(name: str, opt: mo.Optimizer) -> None:
    """d(params and state after 5 steps)/d(every tensor hyperparameter) == central FD."""
    hypers = opt.hyperparams()
    assert hypers, "the case should have tensor hyperparameters"
    ad = dict(zip(hypers, torch.autograd.grad(objective(opt, True), list(hypers.values()))))
    fd = finite_difference(
        lambda h: objective(opt.with_hyperparams(h), False).detach(), dict(hypers)
    )
    assert all(v.abs().sum() > 0 for v in fd.values()), "every hyperparameter should matter"
    assert global_rel_err(ad, fd) < TOL
    for key in fd:  # and each hyperparameter on its own, however small its derivative
        assert global_rel_err({key: ad[key]}, {key: fd[key]}) < 1e-5, key


@pytest.mark.parametrize("cls", [mo.SGD, mo.Adam], ids=["SGD", "Adam"])
def test_per_element_lrs_match_finite_differences(cls: type) -> None:
    """Meta-SGD style learned per-element rates passed through ``lrs``."""
    opt = cls(lr=0.5, **({"momentum": 0.9} if cls is mo.SGD else {}))
    lrs = {k: T((0.02 + 0.01 * torch.rand(v.shape)).tolist()) for k, v in init_params().items()}
    ad = dict(zip(lrs, torch.autograd.grad(objective(opt, True, lrs), list(lrs.values()))))
    fd = finite_difference(lambda r: objective(opt, False, r).detach(), lrs)
    assert global_rel_err(ad, fd) < TOL


def test_hyperparams_names() -> None:
    """Flat, stable names: fields, pair elements, and groups.<i>.<name>; numbers are omitted."""
    opt = mo.Adam(
        lr=T(0.1),
        betas=(T(0.9), 0.999),
        eps=1e-8,
        groups=(mo.Group("head", lr=T(0.2), betas=(0.5, T(0.9))), mo.Group("layer1", weight_decay=T(0.1))),
    )  # fmt: skip
    assert list(opt.hyperparams()) == [
        "lr",
        "betas.0",
        "groups.0.lr",
        "groups.0.betas.1",
        "groups.1.weight_decay",
    ]
    assert mo.SGD(lr=0.1).hyperparams() == {}
    assert list(mo.Rprop(etas=(0.5, T(1.2)), step_sizes=(T(1e-6), 50.0)).hyperparams()) == [
        "etas.1",
        "step_sizes.0",
    ]


def test_with_hyperparams_round_trip() -> None:
    """Substituting the current values gives an equal optimizer; new values take effect."""
    opt = mo.Adam(lr=T(0.05), betas=(T(0.8), 0.99), groups=(mo.Group("layer1", lr=T(0.01)),))
    same = opt.with_hyperparams(opt.hyperparams())
    assert same == opt and same is not opt
    assert all(same.hyperparams()[k] is v for k, v in opt.hyperparams().items())

    new = {"lr": T(0.02), "betas.0": T(0.7), "groups.0.lr": T(0.03), "eps": T(1e-6)}
    swapped = opt.with_hyperparams(new)
    assert list(swapped.hyperparams()) == ["lr", "betas.0", "eps", "groups.0.lr"]
    assert all(swapped.hyperparams()[k] is v for k, v in new.items())
    direct = mo.Adam(lr=0.02, betas=(0.7, 0.99), eps=1e-6, groups=(mo.Group("layer1", lr=0.03),))
    params = init_params()
    grads = grads_at(params)
    a, _ = swapped.update(grads, swapped.init(params), params, 0)
    b, _ = direct.update(grads, direct.init(params), params, 0)
    # Tensor hyperparameters and Python floats round 1 - beta etc. differently, and SIMD
    # paths differ across CPUs: equal to a few ulps, not bitwise (CI saw 1.5e-15).
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=1e-13, atol=0)


def test_eps_root_keeps_second_order_finite_at_zero_gradient() -> None:
    """A parameter with an exactly-zero gradient: torch's Adam gives a NaN meta-gradient,
    eps=0 with eps_root>0 gives a finite one that matches finite differences."""

    def inner_loss(p: dict[str, Tensor]) -> Tensor:
        return (p["w"][0] - 2.0) ** 2 + p["w"][1] ** 4  # gradient of w[1] is 0 at w[1] = 0

    def meta(opt: mo.Optimizer, w0: Tensor, differentiable: bool) -> Tensor:
        params = {"w": w0}
        state = opt.init(params)
        for step in range(3):
            (g,) = torch.autograd.grad(
                inner_loss(params), [params["w"]], create_graph=differentiable
            )
            params, state = opt.update({"w": g}, state, params, step)
        return ((params["w"] - torch.tensor([1.0, 0.5], dtype=DTYPE)) ** 2).sum()

    w0 = torch.tensor([0.0, 0.0], dtype=DTYPE, requires_grad=True)
    (torch_like,) = torch.autograd.grad(meta(mo.Adam(lr=0.1), w0, True), [w0])
    assert torch.isnan(torch_like).any()
    smooth = mo.Adam(lr=0.1, eps=0.0, eps_root=1e-8)
    (ad,) = torch.autograd.grad(meta(smooth, w0, True), [w0])
    assert torch.isfinite(ad).all()
    fd = finite_difference(
        lambda v: meta(smooth, v["w"].requires_grad_(True), False).detach(), {"w": w0}
    )
    torch.testing.assert_close(ad, fd["w"], rtol=1e-6, atol=1e-8)
