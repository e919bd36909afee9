"""grad_norm_penalty: ||grad f||^2 and its second-order gradient 2 H g."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metagrad.derivatives import grad_norm_penalty, hvp

F64 = torch.float64


def test_quadratic_closed_form_value_and_gradient() -> None:
    m = torch.randn(4, 4, dtype=F64)
    a = m @ m.T + torch.eye(4, dtype=F64)
    t = torch.randn(4, dtype=F64, requires_grad=True)
    pen = grad_norm_penalty(lambda s: 0.5 * s @ a @ s, t)
    torch.testing.assert_close(pen, (a @ t).pow(2).sum())
    (g,) = torch.autograd.grad(pen, t)
    torch.testing.assert_close(g, 2 * a.T @ a @ t.detach())
    assert t.grad is None


class SeedNet(nn.Module):
    """The network of seed 003 (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(2, 5, dtype=F64)
        self.out = nn.Linear(5, 1, dtype=F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.mlp(x**2)))


def test_seed003_weight_penalty_matches_raw_torch_and_2Hg() -> None:
    net = SeedNet()
    inp = torch.ones(2, dtype=F64)
    w = net.mlp.weight

    def f(weight: Tensor) -> Tensor:
        return functional_call(net, {"mlp.weight": weight}, (inp,)).sum()

    pen = grad_norm_penalty(f, w)
    (ours,) = torch.autograd.grad(pen, w)
    assert w.grad is None

    # Seed 003 verbatim: gx = grad(f, W, create_graph); (gx**2).sum().backward().
    gx = torch.autograd.grad(net(inp).sum(), w, create_graph=True)[0]
    (gx**2).sum().backward()
    torch.testing.assert_close(ours, w.grad)
    torch.testing.assert_close(ours, 2 * hvp(f, w.detach(), gx.detach()))
    net.zero_grad(set_to_none=True)


def test_input_gradient_penalty_reaches_closed_over_weights() -> None:
    net = SeedNet()
    inp = torch.tensor([0.3, -1.2], dtype=F64)  # data: does not require grad
    pen = grad_norm_penalty(lambda x: net(x).sum(), inp)
    ours = torch.autograd.grad(pen, list(net.parameters()), allow_unused=True)
    assert all(p.grad is None for p in net.parameters())

    x = inp.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    ref = torch.autograd.grad((gx**2).sum(), list(net.parameters()), allow_unused=True)
    for a, b in zip(ours, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("p", "squared"), [(2, True), (2, False), (1, True), (3.5, False)])
def test_gradcheck_and_gradgradcheck(p: float, squared: bool) -> None:
    c = torch.randn(3, 2, dtype=F64)

    def pen(q: Tensor) -> Tensor:
        return grad_norm_penalty(
            lambda s: (torch.sin(s) * c).sum() + (s**3).sum(), q, p=p, squared=squared
        )

    q = torch.randn(3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(pen, (q,))
    assert torch.autograd.gradgradcheck(pen, (q,))


@pytest.mark.parametrize("p", [1, 2, 3.0, math.inf])
def test_norms_over_all_leaves_of_a_dict(p: float) -> None:
    x = {"a": torch.randn(2, 3, dtype=F64), "b": torch.randn(4, dtype=F64)}

    def f(d: dict[str, Tensor]) -> Tensor:
        return (d["a"] ** 3).sum() + torch.exp(d["b"]).sum()

    g = torch.cat([(3 * x["a"] ** 2).reshape(-1), torch.exp(x["b"])])
    norm = torch.linalg.vector_norm(g, ord=p)
    torch.testing.assert_close(grad_norm_penalty(f, x, p=p, squared=False), norm)
    torch.testing.assert_close(grad_norm_penalty(f, x, p=p), norm**2)


def test_create_graph_false_returns_a_detached_value() -> None:
    t = torch.randn(3, dtype=F64, requires_grad=True)
    pen = grad_norm_penalty(lambda s: (s**2).sum(), t, create_graph=False)
    assert not pen.requires_grad
    torch.testing.assert_close(pen, (2 * t.detach()).pow(2).sum())
    assert t.grad is None


def test_smooth_where_the_gradient_vanishes() -> None:
    t = torch.zeros(3, dtype=F64, requires_grad=True)
    pen = grad_norm_penalty(lambda s: (s**2).sum(), t)
    (g,) = torch.autograd.grad(pen, t)
    torch.testing.assert_close(g, torch.zeros(3, dtype=F64))  # 2 H g = 8 t = 0, no NaN
