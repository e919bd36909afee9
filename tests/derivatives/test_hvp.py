"""hvp: closed forms, both modes, independent implementations, finite differences."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metagrad.derivatives import HVPMode, hvp

F64 = torch.float64
MODES: list[HVPMode] = ["rev", "fwd"]


def spd(n: int) -> Tensor:
    m = torch.randn(n, n, dtype=F64)
    return m @ m.T + n * torch.eye(n, dtype=F64)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 2, dtype=F64))


def mlp_problem() -> tuple[nn.Module, dict[str, Tensor], Any]:
    net = make_mlp()
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    x, y = torch.randn(7, 3, dtype=F64), torch.randn(7, 2, dtype=F64)

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(functional_call(net, p, (x,)), y)

    return net, params, loss


def autograd_functional_hvp(loss: Any, params: dict[str, Tensor], v: dict[str, Tensor]) -> Any:
    """Reference: torch.autograd.functional.hvp, which only takes tuples of tensors."""
    names = list(params)
    _, out = torch.autograd.functional.hvp(
        lambda *ts: loss(dict(zip(names, ts, strict=True))),
        tuple(params.values()),
        tuple(v[k] for k in names),
    )
    return dict(zip(names, out, strict=True))


def assert_tree_close(a: Any, b: Any, **kw: Any) -> None:
    if isinstance(a, Tensor):
        torch.testing.assert_close(a, b, **kw)
    else:
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], **kw)


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("mode", MODES)
def test_quadratic_hvp_is_A_v(mode: HVPMode) -> None:
    a = spd(6)
    t, v = torch.randn(6, dtype=F64), torch.randn(6, dtype=F64)
    out = hvp(lambda s: 0.5 * s @ a @ s, t, v, mode=mode)
    torch.testing.assert_close(out, a @ v)
    assert not out.requires_grad


@pytest.mark.parametrize("mode", MODES)
def test_quadratic_on_dict_uses_the_block_matrix(mode: HVPMode) -> None:
    a = spd(5)

    def f(p: dict[str, Tensor]) -> Tensor:
        s = torch.cat([p["u"].reshape(-1), p["w"]])
        return 0.5 * s @ a @ s

    x = {"u": torch.randn(1, 2, dtype=F64), "w": torch.randn(3, dtype=F64)}
    v = {"u": torch.randn(1, 2, dtype=F64), "w": torch.randn(3, dtype=F64)}
    out = hvp(f, x, v, mode=mode)
    want = a @ torch.cat([v["u"].reshape(-1), v["w"]])
    assert isinstance(out, dict)
    torch.testing.assert_close(out["u"], want[:2].reshape(1, 2))
    torch.testing.assert_close(out["w"], want[2:])


# ------------------------------------------------------- independent implementations


@pytest.mark.parametrize("mode", MODES)
def test_mlp_mse_matches_torch_autograd_functional_hvp(mode: HVPMode) -> None:
    _, params, loss = mlp_problem()
    v = {k: torch.randn_like(t) for k, t in params.items()}
    want = autograd_functional_hvp(loss, params, v)
    assert_tree_close(hvp(loss, params, v, mode=mode), want)


@pytest.mark.parametrize("mode", MODES)
def test_mse_loss_zero_tensor_bug_is_handled(mode: HVPMode) -> None:
    # The reproducer from the brief: f = mse_loss(p * x, t) on torch 2.13.
    x, t = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    p, v = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)

    def f(q: Tensor) -> Tensor:
        return F.mse_loss(q * x, t)

    try:  # document the upstream failure while it exists; pass once torch fixes it
        torch.func.jvp(torch.func.grad(f), (p,), (v,))
    except RuntimeError as err:
        assert "ZeroTensors are immutable" in str(err)
    # H = diag(2 x^2 / n) in closed form.
    torch.testing.assert_close(hvp(f, p, v, mode=mode), 2 * x**2 * v / 5)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.MSELoss(),
        nn.MSELoss(reduction="sum"),
        lambda a, b: F.mse_loss(a, b, weight=torch.full_like(a, 0.5)),  # type: ignore[call-arg]
        lambda a, b: F.mse_loss(b, a),  # the prediction as the "target" argument
        lambda a, b: F.huber_loss(a, b, delta=0.3),  # no forward-mode formula: falls back
        F.smooth_l1_loss,
    ],
    ids=["MSELoss", "mse-sum", "mse-weight", "mse-swapped", "huber", "smooth-l1"],
)
def test_fwd_agrees_with_rev_on_common_losses(loss_fn: Any) -> None:
    net = make_mlp()
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)

    def f(p: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(net, p, (x,)), y)

    v = {k: torch.randn_like(t) for k, t in params.items()}
    assert_tree_close(hvp(f, params, v, mode="fwd"), hvp(f, params, v, mode="rev"))


def test_fwd_composes_with_vmap_over_tasks_with_mse() -> None:
    # A batch of 4 tasks, each a linear least-squares problem with its own data.
    xs, ys = torch.randn(4, 6, 3, dtype=F64), torch.randn(4, 6, dtype=F64)
    w, v = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)

    def task_hvp(x: Tensor, y: Tensor) -> Tensor:
        return hvp(lambda q: F.mse_loss(x @ q, y), w, v, mode="fwd")

    out = torch.func.vmap(task_hvp)(xs, ys)
    want = torch.stack([2 * x.T @ (x @ v) / 6 for x in xs])
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------- finite differences


@pytest.mark.parametrize("mode", MODES)
def test_hvp_matches_central_differences_of_the_gradient(mode: HVPMode) -> None:
    _, params, loss = mlp_problem()
    v = {k: torch.randn_like(t) for k, t in params.items()}
    eps = 1e-5

    def grad_at(scale: float) -> dict[str, Tensor]:
        shifted = {k: t + scale * v[k] for k, t in params.items()}
        return torch.func.grad(loss)(shifted)

    plus, minus = grad_at(eps), grad_at(-eps)
    fd = {k: (plus[k] - minus[k]) / (2 * eps) for k in params}
    assert_tree_close(hvp(loss, params, v, mode=mode), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck_through_hvp(mode: HVPMode) -> None:
    w1 = torch.randn(3, 4, dtype=F64)
    x = torch.randn(5, 3, dtype=F64)

    def f(q: Tensor) -> Tensor:
        return torch.tanh(x @ (w1 * q)).pow(2).sum()

    def hv(q: Tensor, v: Tensor) -> Tensor:
        return hvp(f, q, v, mode=mode, create_graph=True)

    q = torch.randn(3, 4, dtype=F64, requires_grad=True)
    v = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(hv, (q, v))
    assert torch.autograd.gradgradcheck(hv, (q, v))
    assert q.grad is None and v.grad is None


# ---------------------------------------------------------------- options and hygiene


@pytest.mark.parametrize("mode", MODES)
def test_has_aux_returns_aux_detached(mode: HVPMode) -> None:
    a = spd(3)
    t = torch.randn(3, dtype=F64, requires_grad=True)
    v = torch.randn(3, dtype=F64)

    def f(s: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return 0.5 * s @ a @ s, {"s2": s * 2}

    out, aux = hvp(f, t, v, mode=mode, has_aux=True)
    torch.testing.assert_close(out, a @ v)
    torch.testing.assert_close(aux["s2"], 2 * t.detach())
    assert not aux["s2"].requires_grad


@pytest.mark.parametrize("mode", MODES)
def test_create_graph_connects_to_x_and_closed_over_tensors(mode: HVPMode) -> None:
    c = torch.tensor(1.5, dtype=F64, requires_grad=True)
    t = torch.randn(4, dtype=F64, requires_grad=True)
    v = torch.randn(4, dtype=F64)
    out = hvp(lambda s: c * (s**3).sum(), t, v, mode=mode, create_graph=True)
    assert isinstance(out, Tensor)
    dt, dc = torch.autograd.grad(out.sum(), (t, c))  # out = 6 c t v
    torch.testing.assert_close(dt, 6 * c.detach() * v)
    torch.testing.assert_close(dc, (6 * t * v).sum().detach())
    assert t.grad is None and c.grad is None


@pytest.mark.parametrize("mode", MODES)
def test_no_dot_grad_accumulation_and_repeatable(mode: HVPMode) -> None:
    net, _, _ = mlp_problem()
    params = dict(net.named_parameters())  # live nn.Parameters with requires_grad=True
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)

    def f(p: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(functional_call(net, p, (x,)), y)

    v = {k: torch.randn_like(t) for k, t in params.items()}
    first = hvp(f, params, v, mode=mode)
    second = hvp(f, params, v, mode=mode)
    assert_tree_close(first, second, rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters())


def test_unused_parameter_raises_in_rev_and_is_zero_when_allowed() -> None:
    x = {"a": torch.randn(2, dtype=F64), "b": torch.randn(3, dtype=F64)}
    v = {k: torch.ones_like(t) for k, t in x.items()}

    def f(p: dict[str, Tensor]) -> Tensor:
        return (p["a"] ** 3).sum()

    with pytest.raises(
        ValueError, match=r"metagrad\.hvp: parameter\(s\) \['b'\].*allow_unused=True"
    ):
        hvp(f, x, v)
    out = hvp(f, x, v, allow_unused=True)
    assert isinstance(out, dict)
    torch.testing.assert_close(out["b"], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(out["a"], 6 * x["a"])
    # torch.func cannot see unused inputs: "fwd" returns the same zeros.
    assert_tree_close(hvp(f, x, v, mode="fwd"), out)


def test_linear_function_has_zero_hvp() -> None:
    t, v = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)
    for mode in MODES:
        out = hvp(lambda s: 2.0 * s.sum(), t, v, mode=mode)
        torch.testing.assert_close(out, torch.zeros(3, dtype=F64))
