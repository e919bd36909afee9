"""hessian and jacobian: seed 002, quadratics, torch.func / torch.autograd.functional."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metagrad.derivatives import hessian, jacobian

F64 = torch.float64


def seed002_point(requires_grad: bool = False) -> dict[str, Tensor]:
    return {
        "x": torch.tensor([3.0, 1.0], dtype=F64, requires_grad=requires_grad),
        "y": torch.tensor([1.0, 2.0], dtype=F64, requires_grad=requires_grad),
    }


def w_of(p: dict[str, Tensor]) -> Tensor:
    """Seed 002: z = x.y, w = z^2."""
    return (p["x"] * p["y"]).sum() ** 2


# ---------------------------------------------------------------- seed 002


def test_seed002_first_derivatives_from_jacobian() -> None:
    jac = jacobian(w_of, seed002_point())
    assert isinstance(jac, dict)
    torch.testing.assert_close(jac["x"], torch.tensor([10.0, 20.0], dtype=F64))
    torch.testing.assert_close(jac["y"], torch.tensor([30.0, 10.0], dtype=F64))


def test_seed002_second_derivatives_from_hessian() -> None:
    hess = hessian(w_of, seed002_point())
    assert isinstance(hess, dict)
    # Row 0 of the x-blocks is d(dw/dx_1)/d(.).
    torch.testing.assert_close(hess["x"]["x"][0], torch.tensor([2.0, 4.0], dtype=F64))
    torch.testing.assert_close(hess["x"]["y"][0], torch.tensor([16.0, 2.0], dtype=F64))
    # Closed form: H_xx = 2 y y^T, H_xy = 2 (y x^T + z I), z = 5.
    p = seed002_point()
    x, y, eye = p["x"], p["y"], torch.eye(2, dtype=F64)
    torch.testing.assert_close(hess["x"]["y"], 2 * (torch.outer(y, x) + 5 * eye))
    torch.testing.assert_close(hess["y"]["y"], 2 * torch.outer(x, x))
    torch.testing.assert_close(hess["y"]["x"], hess["x"]["y"].T)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_seed002_accumulation_trap_does_not_happen() -> None:
    # Raw torch, as in seed 002: backward(create_graph=True), then backward through
    # x.grad[0] without zeroing .grad sums first- and second-order derivatives.
    p = seed002_point(requires_grad=True)
    w_of(p).backward(create_graph=True)
    x_grad = p["x"].grad
    assert x_grad is not None
    x_grad[0].backward()
    assert p["x"].grad is not None and p["y"].grad is not None
    trap_x, trap_y = p["x"].grad.detach().clone(), p["y"].grad.detach().clone()
    torch.testing.assert_close(trap_x, torch.tensor([12.0, 24.0], dtype=F64))
    torch.testing.assert_close(trap_y, torch.tensor([46.0, 12.0], dtype=F64))
    p["x"].grad = p["y"].grad = None  # break the grad <-> graph reference cycle

    # Ours, on fresh leaves that require grad: the clean values, twice, .grad untouched.
    q = seed002_point(requires_grad=True)
    for _ in range(2):
        hess = hessian(w_of, q)
        assert isinstance(hess, dict)
        torch.testing.assert_close(hess["x"]["x"][0], torch.tensor([2.0, 4.0], dtype=F64))
        torch.testing.assert_close(hess["x"]["y"][0], torch.tensor([16.0, 2.0], dtype=F64))
        assert not torch.equal(hess["x"]["y"][0], trap_y)
        jac = jacobian(w_of, q)
        assert isinstance(jac, dict)
        torch.testing.assert_close(jac["x"], torch.tensor([10.0, 20.0], dtype=F64))
    assert q["x"].grad is None and q["y"].grad is None


# ---------------------------------------------------------------- closed forms


def test_quadratic_hessian_is_A() -> None:
    m = torch.randn(5, 5, dtype=F64)
    a = m + m.T  # symmetric, indefinite is fine
    hess = hessian(lambda t: 0.5 * t @ a @ t, torch.randn(5, dtype=F64))
    torch.testing.assert_close(hess, a)


def test_shapes_follow_input_shapes() -> None:
    t = torch.randn(2, 3, dtype=F64)
    assert hessian(lambda s: (s**3).sum(), t).shape == (2, 3, 2, 3)
    assert jacobian(lambda s: s.sum(0) ** 2, t).shape == (3, 2, 3)
    assert jacobian(lambda s: (s**2).sum(), t).shape == (2, 3)


def test_linear_function_has_zero_hessian_not_an_error() -> None:
    t = torch.randn(3, dtype=F64)
    torch.testing.assert_close(hessian(lambda s: 4.0 * s.sum(), t), torch.zeros(3, 3, dtype=F64))


# ------------------------------------------------------- independent implementations


def mlp_loss() -> tuple[dict[str, Tensor], Any]:
    net = nn.Sequential(nn.Linear(3, 4, dtype=F64), nn.Tanh(), nn.Linear(4, 1, dtype=F64))
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 1, dtype=F64)

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(functional_call(net, p, (x,)), y)

    return params, loss


def test_mlp_hessian_matches_torch_func_hessian() -> None:
    params, loss = mlp_loss()
    ours = hessian(loss, params)
    # torch.func.hessian is jacfwd over jacrev (vmapped forward-over-reverse: unlike a plain
    # jvp it escapes the mse_loss ZeroTensor bug); jacrev over jacrev is a second reference.
    for ref in (
        torch.func.hessian(loss)(params),
        torch.func.jacrev(torch.func.jacrev(loss))(params),
    ):
        assert isinstance(ours, dict)
        for a in params:
            for b in params:
                torch.testing.assert_close(ours[a][b], ref[a][b])


def test_tensor_hessian_matches_torch_func_and_autograd_functional() -> None:
    w1, x = torch.randn(4, 3, dtype=F64), torch.randn(5, 3, dtype=F64)

    def f(q: Tensor) -> Tensor:
        return torch.tanh(x @ (w1 * q).T).pow(2).mean()

    q = torch.randn(4, 3, dtype=F64)
    ours = hessian(f, q)
    torch.testing.assert_close(ours, torch.func.hessian(f)(q))
    torch.testing.assert_close(ours, torch.autograd.functional.hessian(f, q))


def test_jacobian_matches_torch_autograd_functional_and_jacrev() -> None:
    a = torch.randn(4, 3, dtype=F64)

    def f(q: Tensor) -> Tensor:
        return torch.sin(a @ q).reshape(2, 2, 2)

    q = torch.randn(3, 2, dtype=F64)
    ours = jacobian(f, q)
    assert isinstance(ours, Tensor) and ours.shape == (2, 2, 2, 3, 2)
    torch.testing.assert_close(ours, torch.autograd.functional.jacobian(f, q))
    torch.testing.assert_close(ours, torch.func.jacrev(f)(q))


def test_jacobian_dict_in_dict_out_matches_jacrev() -> None:
    params, _ = mlp_loss()

    def f(p: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"u": torch.tanh(p["0.weight"]).sum(1), "s": (p["2.weight"] * p["0.bias"]).sum()}

    ours = jacobian(f, params, allow_unused=True)  # "2.bias" never reaches the output
    ref = torch.func.jacrev(f)(params)
    assert isinstance(ours, dict)
    for out_key in ("u", "s"):
        for in_key in params:
            torch.testing.assert_close(ours[out_key][in_key], ref[out_key][in_key])


# ---------------------------------------------------------------- options and hygiene


def test_create_graph_hessian_is_differentiable() -> None:
    t = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    hess = hessian(lambda s: (s**4).sum(), t, create_graph=True)  # diag(12 s^2)
    assert isinstance(hess, Tensor) and hess.requires_grad
    (third,) = torch.autograd.grad(hess.trace(), t)
    torch.testing.assert_close(third, 24 * t.detach())
    assert t.grad is None


def test_results_are_detached_by_default() -> None:
    t = torch.randn(3, dtype=F64, requires_grad=True)
    assert not hessian(lambda s: (s**3).sum(), t).requires_grad
    assert not jacobian(lambda s: s**3, t).requires_grad


def test_unused_parameter_errors_and_allow_unused() -> None:
    x = {"a": torch.randn(2, dtype=F64), "b": torch.randn(2, dtype=F64)}

    def f(p: dict[str, Tensor]) -> Tensor:
        return (p["a"] ** 2).sum()

    with pytest.raises(
        ValueError, match=r"metagrad\.hessian: parameter\(s\) \['b'\].*allow_unused=True"
    ):
        hessian(f, x)
    with pytest.raises(
        ValueError, match=r"metagrad\.jacobian: parameter\(s\) \['b'\].*allow_unused=True"
    ):
        jacobian(f, x)
    hess = hessian(f, x, allow_unused=True)
    assert isinstance(hess, dict)
    torch.testing.assert_close(hess["a"]["a"], 2 * torch.eye(2, dtype=F64))
    torch.testing.assert_close(hess["b"]["b"], torch.zeros(2, 2, dtype=F64))
    torch.testing.assert_close(hess["a"]["b"], torch.zeros(2, 2, dtype=F64))
