"""metagrad.bilevel.innerloop: an ordinary training loop made differentiable.

Hypergradients through 5 steps are checked against an independent implementation (a plain
unrolled loop with hand-written optimizer rules and ``torch.autograd.grad(create_graph=True)``)
and against central finite differences, in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad
from metagrad.bilevel import DiffOptimizer, FastModel, innerloop
from metagrad.optim import SGD, Adam

STEPS = 5


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _mlp_forward(w: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.tanh(x @ w["0.weight"].T + w["0.bias"])
    return h @ w["2.weight"].T + w["2.bias"]


def _data() -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)) for _ in range(STEPS)
    ]
    return batches, (torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g))


# ---------------------------------------------------------------- independent reference
Params = dict[str, Tensor]


def _ref_sgd_momentum(
    w: Params, grads: Params, state: dict, t: int, lr: Tensor, mu: float
) -> Params:
    out = {}
    for k in w:
        buf = grads[k] if t == 0 else mu * state[k] + grads[k]
        state[k] = buf
        out[k] = w[k] - lr * buf
    return out


def _ref_adam(
    w: Params, grads: Params, state: dict, t: int, lr: Tensor, b1: float = 0.9, b2: float = 0.999
) -> Params:
    eps = 1e-8
    out = {}
    for k in w:
        m0, v0 = state.get(k, (torch.zeros_like(w[k]), torch.zeros_like(w[k])))
        m = b1 * m0 + (1 - b1) * grads[k]
        v = b2 * v0 + (1 - b2) * grads[k] ** 2
        state[k] = (m, v)
        denom = v.sqrt() / math.sqrt(1 - b2 ** (t + 1)) + eps
        out[k] = w[k] - lr / (1 - b1 ** (t + 1)) * m / denom
    return out


def _reference(kind: str, w0: dict[str, Tensor], lr: Tensor, wd: Tensor) -> Tensor:
    batches, (xv, yv) = _data()
    w, state = dict(w0), {}
    for t, (x, y) in enumerate(batches):
        loss = F.mse_loss(_mlp_forward(w, x), y) + wd * sum((v**2).sum() for v in w.values())
        gs = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        grads = dict(zip(w, gs))
        if kind == "sgd":
            w = _ref_sgd_momentum(w, grads, state, t, lr, 0.9)
        else:
            w = _ref_adam(w, grads, state, t, lr)
    return F.mse_loss(_mlp_forward(w, xv), yv)


def _optimizer(kind: str, lr: Tensor) -> metagrad.optim.Optimizer:
    return SGD(lr=lr, momentum=0.9) if kind == "sgd" else Adam(lr=lr)


def _meta_loss(kind: str, model: nn.Module, lr: Tensor, wd: Tensor) -> Tensor:
    batches, (xv, yv) = _data()
    with innerloop(model, _optimizer(kind, lr)) as (fmodel, diffopt):
        for x, y in batches:
            # wd is closed over by the loss: plain autograd reaches it.
            reg = wd * sum((v**2).sum() for v in fmodel.parameters())
            diffopt.step(F.mse_loss(fmodel(x), y) + reg)
        return F.mse_loss(fmodel(xv), yv)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_hypergradient_equals_unrolled_reference(kind: str) -> None:
    model = _mlp()
    lr = torch.tensor(0.05 if kind == "sgd" else 0.02, requires_grad=True)
    wd = torch.tensor(0.01, requires_grad=True)
    _meta_loss(kind, model, lr, wd).backward()
    got = [p.grad for p in model.parameters()] + [lr.grad, wd.grad]

    w0 = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    lr2 = lr.detach().clone().requires_grad_()
    wd2 = wd.detach().clone().requires_grad_()
    ref = torch.autograd.grad(_reference(kind, w0, lr2, wd2), [*w0.values(), lr2, wd2])
    for g, r in zip(got, ref):
        assert g is not None
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    assert float(lr.grad.abs()) > 1e-4  # a real dependence, not a trivially zero one


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_hypergradient_equals_finite_differences(kind: str) -> None:
    model = _mlp()
    lr = torch.tensor(0.05 if kind == "sgd" else 0.02, requires_grad=True)
    wd = torch.tensor(0.01)
    _meta_loss(kind, model, lr, wd).backward()
    eps = 1e-6

    def value(lr_value: float, shift: float, direction: list[Tensor]) -> float:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(m.parameters(), direction):
                p.add_(shift * d)
        return float(_meta_loss(kind, m, torch.tensor(lr_value), wd).detach())

    zero = [torch.zeros_like(p) for p in model.parameters()]
    fd_lr = (
        value(float(lr.detach()) + eps, 0.0, zero) - value(float(lr.detach()) - eps, 0.0, zero)
    ) / (2 * eps)
    assert abs(fd_lr - float(lr.grad)) < 1e-6

    direction = [torch.randn_like(p) for p in model.parameters()]
    fd_w = (
        value(float(lr.detach()), eps, direction) - value(float(lr.detach()), -eps, direction)
    ) / (2 * eps)
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(model.parameters(), direction))
    assert abs(fd_w - analytic) < 1e-6


def test_torch_optimizer_is_converted_and_iterates_match() -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    batches, _ = _data()
    with innerloop(model, opt) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(F.mse_loss(fmodel(x), y))
        fast = fmodel.fast_params
    ref_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for x, y in batches:
        ref_opt.zero_grad()
        F.mse_loss(twin(x), y).backward()
        ref_opt.step()
    for name, p in twin.named_parameters():
        torch.testing.assert_close(fast[name].detach(), p.detach(), rtol=0, atol=1e-12)


def test_torch_optimizer_over_a_subset_adapts_only_that_subset() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    batches, _ = _data()
    with innerloop(model, opt) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(batches[0][0]), batches[0][1]))
        fast = fmodel.fast_params
    torch.testing.assert_close(fast["0.weight"], model[0].weight)
    assert not torch.equal(fast["2.weight"], model[2].weight)


def _bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 2)
    )


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bn", ["running", "private", "transductive"])
def test_module_untouched(train: bool, bn: str) -> None:
    model = _bn_model()
    with torch.no_grad():
        model(torch.randn(10, 3))  # non-trivial running statistics
    model.train(train)
    model[3].eval()  # mixed flags must survive too
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    batches, (xv, yv) = _data()
    lr = torch.tensor(0.1, requires_grad=True)
    with innerloop(model, SGD(lr=lr, momentum=0.5), bn=bn) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(F.mse_loss(fmodel(x), y))
        fmodel.eval()
        F.mse_loss(fmodel(xv), yv).backward()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is not None for p in model.parameters())
    assert lr.grad is not None


def test_bn_policies() -> None:
    model = _bn_model().train()
    x = torch.randn(8, 3) * 3 + 1
    for bn in ("running", "private"):
        fm = FastModel(model, bn=bn)
        fm(x)  # train mode: batch statistics; "private" updates its own copy
        moved = not torch.equal(fm.buffers()["1.running_mean"], model[1].running_mean)
        assert moved == (bn == "private")
    fm = FastModel(model.eval(), bn="running")
    torch.testing.assert_close(fm(x), model(x))  # eval: the module's running statistics
    fm = FastModel(model.eval(), bn="transductive")
    assert "1.running_mean" not in fm.buffers()
    torch.testing.assert_close(fm(x), model.train()(x))  # batch statistics even in eval
    with pytest.raises(ValueError, match="bn='nope'"):
        FastModel(model, bn="nope")


def test_copy_initial_weights_and_history() -> None:
    model = _mlp()
    batches, (xv, yv) = _data()
    with innerloop(model, SGD(lr=0.1), copy_initial_weights=True) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(F.mse_loss(fmodel(x), y))
        loss = F.mse_loss(fmodel(xv), yv)
        grads = torch.autograd.grad(loss, fmodel.parameters(time=0))
    assert all(p.grad is None for p in model.parameters())
    assert len(fmodel.history) == STEPS + 1
    assert all(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="time=9 is out of range"):
        fmodel.parameters(time=9)
    # The same gradients as with copy_initial_weights=False, delivered to the model instead.
    with innerloop(model, SGD(lr=0.1)) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(xv), yv).backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)


def test_track_higher_grads_false_keeps_latest_only_and_no_graph() -> None:
    model = _mlp()
    batches, _ = _data()
    with innerloop(model, Adam(lr=0.01), track_higher_grads=False) as (fmodel, diffopt):
        for x, y in batches:
            new = diffopt.step(F.mse_loss(fmodel(x), y))
        assert all(v.grad_fn is None and v.requires_grad for v in new.values())
        assert len(fmodel.history) == 1
        assert all(t.grad_fn is None for t in diffopt.state.exp_avg.values())
        with pytest.raises(ValueError, match="not tracked"):
            fmodel.parameters(time=2)


def test_unused_parameters_error_unless_allowed() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x)

    model = TwoHeads()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with innerloop(model, Adam(lr=0.1)) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"\['b.weight', 'b.bias'\] do not reach the loss"):
            diffopt.step(F.mse_loss(fmodel(x), y))
    with innerloop(model, Adam(lr=0.1), allow_unused=True) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        assert fmodel.fast_params["b.weight"] is fmodel.params(0)["b.weight"]
        assert diffopt.step_counts == {"a.weight": 1, "a.bias": 1, "b.weight": 0, "b.bias": 0}


def test_bad_losses_are_clear_errors() -> None:
    model = _mlp()
    x = torch.randn(4, 3)
    with innerloop(model, SGD(lr=0.1)) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"scalar tensor, got shape \(4, 2\)"):
            diffopt.step(fmodel(x))
        with pytest.raises(ValueError, match="does not require grad"):
            diffopt.step(model(x).sum().detach())
        with pytest.raises(TypeError, match="got float"):
            diffopt.step(1.0)  # type: ignore[arg-type]
        with pytest.raises(metagrad.NonFiniteError, match="inner step 0"):
            diffopt.step(fmodel(x).sum() * float("nan"))
    with pytest.raises(TypeError, match="optimizer must be"):
        with innerloop(model, object()):  # type: ignore[arg-type]
            pass


def test_override_with_tensor_hyperparameters() -> None:
    model = _mlp()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    lr = torch.tensor(0.3, requires_grad=True)
    with innerloop(model, SGD(lr=0.1), override={"lr": lr}) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        lr2 = torch.tensor(0.2, requires_grad=True)
        diffopt.step(F.mse_loss(fmodel(x), y), override={"lr": lr2})
        F.mse_loss(fmodel(x), y).backward()
    assert lr.grad is not None and lr2.grad is not None
    with innerloop(model, SGD(lr=0.1)) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="unknown key 'lrr'"):
            diffopt.step(F.mse_loss(fmodel(x), y), override={"lrr": lr})


def test_params_argument_grad_callback_and_views() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.MaxPool1d(1))
            self.head = nn.Linear(4, 2)

        def embed(self, x: Tensor) -> Tensor:
            return self.body(x)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.embed(x))

    model = Net()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with innerloop(model, SGD(lr=0.1)) as (fmodel, diffopt):
        zeros = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
        assert torch.equal(fmodel(x, params=zeros), torch.zeros(4, 2))
        assert len(fmodel.history) == 1  # params= is for that call only
        new = diffopt.step(
            F.mse_loss(fmodel(x), y), grad_callback=lambda g: {k: 0 * v for k, v in g.items()}
        )
        for k, v in new.items():
            torch.testing.assert_close(v, fmodel.params(0)[k])
        diffopt.step(F.mse_loss(fmodel(x), y))
        fast = fmodel.fast_params
        torch.testing.assert_close(fmodel.head(fmodel.embed(x)), fmodel(x))
        torch.testing.assert_close(
            fmodel.body[0](x), F.linear(x, fast["body.0.weight"], fast["body.0.bias"])
        )
        assert fmodel.head.weight is fast["head.weight"]
        assert len(fmodel.body) == 3


def test_standalone_diffoptimizer() -> None:
    w = {"w": torch.tensor([1.0, -2.0], requires_grad=True)}
    opt = DiffOptimizer(Adam(lr=0.1))
    for _ in range(3):
        w = opt.step((w["w"] ** 2).sum(), params=w)
    ref = torch.tensor([1.0, -2.0], requires_grad=True)
    torch_opt = torch.optim.Adam([ref], lr=0.1)
    for _ in range(3):
        torch_opt.zero_grad()
        (ref**2).sum().backward()
        torch_opt.step()
    torch.testing.assert_close(w["w"].detach(), ref.detach(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no weights to update"):
        opt.step((w["w"] ** 2).sum())


def test_attention_layers_at_second_order() -> None:
    # PyTorch's fused attention kernels have no double backward; the functional model runs
    # attention on the math kernel while higher-order gradients are tracked.
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model.eval()
    x = torch.randn(3, 5, 8)
    with innerloop(model, SGD(lr=0.1)) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(fmodel(x).pow(2).mean())
        fmodel(x).pow(2).mean().backward()
    w = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    fast = dict(w)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            for _ in range(2):
                loss = functional_call(model, fast, (x,)).pow(2).mean()
                gs = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {k: v - 0.1 * g for (k, v), g in zip(fast.items(), gs)}
            ref = torch.autograd.grad(
                functional_call(model, fast, (x,)).pow(2).mean(), list(w.values())
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=0, atol=1e-10)
