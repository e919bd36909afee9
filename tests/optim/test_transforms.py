"""The optimizers under torch.func.grad, vmap and jvp (forward mode), composed as meta-learning
uses them: the inner gradients themselves come from torch.func.grad."""

from __future__ import annotations

import pytest
import torch
from optim_cases import DTYPE, func_grads, grads_at, init_params, loss
from torch import Tensor

import metagrad.optim as mo

STEPS = 5


def T(value: float) -> Tensor:
    return torch.tensor(value, dtype=DTYPE)


OPTS = {
    "SGD-momentum": mo.SGD(lr=T(0.1), momentum=T(0.9), weight_decay=0.01, nesterov=True),
    "Adam": mo.Adam(lr=T(0.05), betas=(T(0.8), T(0.95)), eps=1e-3, amsgrad=True),
}


def run(opt: mo.Optimizer, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``STEPS`` updates with torch.func gradients; the final parameters."""
    state = opt.init(params)
    for step in range(STEPS):
        params, state = opt.update(func_grads(params), state, params, step)
    return params


def meta_loss(hypers: dict[str, Tensor], params: dict[str, Tensor], opt: mo.Optimizer) -> Tensor:
    return loss(run(opt.with_hyperparams(hypers), params))


def autograd_meta_grad(
    opt: mo.Optimizer, params: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The independent reference: an unrolled loop with autograd.grad(create_graph=True)."""
    hypers = {k: v.detach().clone().requires_grad_(True) for k, v in opt.hyperparams().items()}
    p0 = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    o = opt.with_hyperparams(hypers)
    p, state = p0, o.init(p0)
    for step in range(STEPS):
        p, state = o.update(grads_at(p, create_graph=True), state, p, step)
    leaves = [*hypers.values(), *p0.values()]
    g = torch.autograd.grad(loss(p), leaves)
    return dict(zip(hypers, g[: len(hypers)])), dict(zip(p0, g[len(hypers) :]))


def assert_tree_close(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=rtol, msg=k)


@pytest.mark.parametrize("name", OPTS)
def test_func_grad_matches_autograd(name: str) -> None:
    """torch.func.grad of the meta-loss in hyperparameters and initial parameters."""
    opt = OPTS[name]
    gh, gp = torch.func.grad(meta_loss, argnums=(0, 1))(opt.hyperparams(), init_params(), opt)
    rh, rp = autograd_meta_grad(opt, init_params())
    assert_tree_close(gh, rh)
    assert_tree_close(gp, rp)


def _batch(n: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        k: v + 0.1 * torch.randn((n, *v.shape), generator=gen, dtype=DTYPE)
        for k, v in init_params().items()
    }


@pytest.mark.parametrize("name", OPTS)
def test_vmap_over_parameter_dicts(name: str) -> None:
    """vmap over a batch of parameter dicts == one run per dict; and vmap(grad(...)) per task."""
    opt = OPTS[name]
    batch = _batch(3)
    out = torch.func.vmap(lambda p: run(opt, p))(batch)
    per_task = torch.func.vmap(torch.func.grad(meta_loss), in_dims=(None, 0, None))(
        opt.hyperparams(), batch, opt
    )
    for i in range(3):
        p_i = {k: v[i] for k, v in batch.items()}
        assert_tree_close({k: v[i] for k, v in out.items()}, run(opt, p_i))
        ref, _ = autograd_meta_grad(opt, p_i)
        assert_tree_close({k: v[i] for k, v in per_task.items()}, ref)


@pytest.mark.parametrize("name", OPTS)
def test_vmap_over_hyperparameters(name: str) -> None:
    """A batch of learning rates through with_hyperparams (batched wrapped tensors)."""
    opt = OPTS[name]
    lrs = torch.tensor([0.01, 0.05, 0.1], dtype=DTYPE)
    out = torch.func.vmap(lambda lr: run(opt.with_hyperparams({"lr": lr}), init_params()))(lrs)
    for i, lr in enumerate(lrs):
        assert_tree_close(
            {k: v[i] for k, v in out.items()}, run(opt.with_hyperparams({"lr": lr}), init_params())
        )


@pytest.mark.parametrize("name", OPTS)
def test_jvp_matches_finite_differences(name: str) -> None:
    """Forward mode through the trajectory (forward-over-reverse for the inner gradients)."""
    opt = OPTS[name]
    hypers = opt.hyperparams()
    tangent = {k: torch.full_like(v, 0.3 + 0.1 * i) for i, (k, v) in enumerate(hypers.items())}
    p_tangent = {
        k: torch.cos(torch.arange(v.numel(), dtype=DTYPE)).reshape(v.shape)
        for k, v in init_params().items()
    }

    def final(h: dict[str, Tensor], p: dict[str, Tensor]) -> dict[str, Tensor]:
        return run(opt.with_hyperparams(h), p)

    _, jvp_out = torch.func.jvp(final, (hypers, init_params()), (tangent, p_tangent))
    eps = 1e-6

    def shifted(s: float) -> dict[str, Tensor]:
        h = {k: v + s * tangent[k] for k, v in hypers.items()}
        return final(h, {k: v + s * p_tangent[k] for k, v in init_params().items()})

    plus, minus = shifted(eps), shifted(-eps)
    fd = {k: (plus[k] - minus[k]) / (2 * eps) for k in plus}
    num = sum(((jvp_out[k] - fd[k]) ** 2).sum() for k in fd) ** 0.5
    den = sum((fd[k] ** 2).sum() for k in fd) ** 0.5
    assert num / den < 1e-6
