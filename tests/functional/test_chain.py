"""The direct forward of plain Linear/activation chains equals ``functional_call``'s.

Same values and the same derivatives up to second order (float64, whole-gradient relative
error), and it steps aside whenever ``functional_call`` could behave differently: hooks,
global hooks, buffer overrides, other key sets, subclassed or non-stock layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metagrad.functional import FunctionalModel
from metagrad.functional._chain import Chain

D = torch.float64


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.0), nn.Linear(8, 2)
    ).to(D)


def _second_order(forward, params: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    """d/dp of || d loss / dp ||^2 (a double backward through the forward)."""
    loss = (forward(params, x) ** 2).sum()
    gs = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return list(torch.autograd.grad(sum((g**2).sum() for g in gs), list(params.values())))


def _rel(a: list[Tensor], b: list[Tensor]) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


def test_chain_equals_functional_call_to_second_order() -> None:
    model = _mlp()
    chain = Chain.of(model)
    assert chain is not None
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x = torch.randn(5, 3, dtype=D)
    assert chain.usable(params, {})
    ref = functional_call(model, params, (x,))
    assert torch.equal(chain(params, x), ref)
    got = _second_order(lambda p, z: chain(p, z), params, x)
    want = _second_order(lambda p, z: functional_call(model, p, (z,)), params, x)
    assert _rel(got, want) < 1e-14


def test_chain_under_vmap_and_grad_equals_functional_call() -> None:
    model = _mlp()
    chain = Chain.of(model)
    assert chain is not None
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(4, 5, 3, dtype=D)

    def per_task(fwd):
        def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
            g = torch.func.grad(lambda q: (fwd(q, x) ** 2).sum())(p)
            q = {k: p[k] - 0.1 * g[k] for k in p}
            return (fwd(q, x) ** 2).sum()

        return torch.func.grad(lambda p: torch.func.vmap(loss, (None, 0))(p, xs).sum())(params)

    got = per_task(lambda p, x: chain(p, x))
    want = per_task(lambda p, x: functional_call(model, p, (x,)))
    assert _rel(list(got.values()), list(want.values())) < 1e-14


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),  # buffers
        nn.Sequential(nn.Linear(3, 4, bias=False)),  # no bias
        nn.Sequential(nn.Sequential(nn.Linear(3, 4))),  # nested
        nn.Sequential(nn.Conv1d(3, 4, 1)),  # not a stock linear layer
        nn.Sequential(nn.PReLU()),  # an activation with a parameter
        nn.Linear(3, 4),  # not a Sequential
    ],
)
def test_no_chain_for_other_models(model: nn.Module) -> None:
    assert Chain.of(model) is None


def test_subclassed_layers_are_not_chained() -> None:
    class MyLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    assert Chain.of(nn.Sequential(MyLinear(3, 4), nn.ReLU())) is None


def test_hooks_and_other_inputs_fall_back_to_functional_call() -> None:
    model = _mlp()
    chain = Chain.of(model)
    assert chain is not None
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert chain.usable(params, {})
    assert not chain.usable({**params, "extra": params["0.weight"]}, {})
    assert not chain.usable({k: v for k, v in params.items() if k != "0.bias"}, {})
    assert not chain.usable(params, {"b": torch.zeros(1)})
    handle = model[1].register_forward_hook(lambda m, i, o: o * 3)
    assert not chain.usable(params, {})
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not chain.usable(params, {})
    finally:
        handle.remove()
    assert chain.usable(params, {})


def test_functional_model_runs_the_hook_when_the_template_has_one() -> None:
    """A hook on the private copy (as a user could add to fm.template) is honoured."""
    model = _mlp()
    fm = FunctionalModel.from_module(model)
    x = torch.randn(5, 3, dtype=D)
    params = fm.params()
    plain = fm.forward(params, fm.buffers(), x)
    handle = fm.template[5].register_forward_hook(lambda m, i, o: o * 3)
    try:
        hooked = fm.forward(params, fm.buffers(), x)
    finally:
        handle.remove()
    assert torch.allclose(hooked, 3 * plain)
