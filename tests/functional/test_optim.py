"""Inner optimizers: one update against hand-written formulas, and smoothness of Adam."""

from __future__ import annotations

import torch

from metagrad.functional import SGD, Adam, Momentum

F64 = torch.float64


def test_sgd_update() -> None:
    p, g = {"w": torch.tensor([1.0, 2.0], dtype=F64)}, {"w": torch.tensor([0.5, -1.0], dtype=F64)}
    opt = SGD()
    new, _ = opt.update(g, opt.init(p), p, {"w": 0.1}, 0)
    assert torch.equal(new["w"], torch.tensor([0.95, 2.1], dtype=F64))


def test_momentum_two_updates() -> None:
    """m1 = g1, t1 = t0 - a g1; m2 = b g1 + g2, t2 = t1 - a m2 (Nesterov: t - a (g + b m))."""
    t0 = {"w": torch.tensor([1.0], dtype=F64)}
    g1, g2 = {"w": torch.tensor([2.0], dtype=F64)}, {"w": torch.tensor([-1.0], dtype=F64)}
    opt = Momentum(beta=0.5)
    t1, s = opt.update(g1, opt.init(t0), t0, {"w": 0.1}, 0)
    t2, _ = opt.update(g2, s, t1, {"w": 0.1}, 1)
    assert torch.allclose(t1["w"], torch.tensor([0.8], dtype=F64))
    assert torch.allclose(t2["w"], torch.tensor([0.8 - 0.1 * (0.5 * 2 - 1)], dtype=F64))
    nes = Momentum(beta=0.5, nesterov=True)
    n1, _ = nes.update(g1, nes.init(t0), t0, {"w": 0.1}, 0)
    assert torch.allclose(n1["w"], torch.tensor([1.0 - 0.1 * (2 + 0.5 * 2)], dtype=F64))


def test_adam_eps_inside_sqrt_and_bias_correction() -> None:
    g = torch.tensor([3.0, 1e-6], dtype=F64)
    t0 = {"w": torch.zeros(2, dtype=F64)}
    opt = Adam(b1=0.9, b2=0.99, eps=1e-4)
    t1, s = opt.update({"w": g}, opt.init(t0), t0, {"w": 0.1}, 0)
    # step 1: m_hat = g, v_hat = g^2 exactly.
    assert torch.allclose(t1["w"], -0.1 * g / torch.sqrt(g * g + 1e-4), rtol=1e-14)
    t2, _ = opt.update({"w": g}, s, t1, {"w": 0.1}, 1)
    m = 0.9 * 0.1 * g + 0.1 * g
    v = 0.99 * 0.01 * g * g + 0.01 * g * g
    mh, vh = m / (1 - 0.9**2), v / (1 - 0.99**2)
    assert torch.allclose(t2["w"], t1["w"] - 0.1 * mh / torch.sqrt(vh + 1e-4), rtol=1e-14)


def test_adam_second_derivative_finite_at_zero_gradient() -> None:
    """With eps inside the square root the update is smooth at g = 0 (standard Adam is not)."""
    opt = Adam()
    t0 = {"w": torch.zeros(3, dtype=F64)}

    def step(g: torch.Tensor) -> torch.Tensor:
        new, _ = opt.update({"w": g}, opt.init(t0), t0, {"w": 0.1}, 0)
        return new["w"].sum()

    g0 = torch.zeros(3, dtype=F64)
    H = torch.autograd.functional.hessian(step, g0)
    J = torch.autograd.functional.jacobian(step, g0)
    assert bool(torch.isfinite(H).all()) and bool(torch.isfinite(J).all())
    assert torch.allclose(J, torch.full((3,), -0.1 / 1e-4, dtype=F64))


def test_learned_rate_tensor_broadcasts() -> None:
    p, g = {"w": torch.ones(2, 3, dtype=F64)}, {"w": torch.ones(2, 3, dtype=F64)}
    lr = torch.arange(6, dtype=F64).reshape(2, 3)
    new, _ = SGD().update(g, {}, p, {"w": lr}, 0)
    assert torch.equal(new["w"], 1 - lr)
