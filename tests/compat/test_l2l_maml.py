"""learn2learn-compatible MAML / MetaSGD: learn2learn's usage patterns, checked in float64.

References: a manual unrolled loop with ``torch.autograd.grad`` on leaf copies of the
parameters, a closed form on a quadratic, and ``metagrad.algorithms.MAML``.
"""

from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mg_l2l_fixtures import SineModel
from torch import Tensor, nn
from torch.func import functional_call

import metagrad.compat._l2l_clone as clone_impl
import metagrad.compat._l2l_maml as maml_impl
import metagrad.compat.learn2learn as l2l
from metagrad.algorithms import MAML as MetagradMAML

DT = torch.float64


def mlp(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).to(DT)


def task(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, 2, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)
    w = torch.randn(2, 1, generator=g, dtype=DT)
    return xs, torch.sin(xs @ w), xq, torch.sin(xq @ w)


def manual_meta_grad(
    model: nn.Module, data: tuple[Tensor, Tensor, Tensor, Tensor], lr: float, steps: int, order: int
) -> list[Tensor]:
    """Independent reference: unrolled SGD on leaf copies with functional_call."""
    xs, ys, xq, yq = data
    theta = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    fast = dict(theta)
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, fast, (xs,)), ys)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=order == 2)
        fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads)}
    query = F.mse_loss(functional_call(model, fast, (xq,)), yq)
    return list(torch.autograd.grad(query, list(theta.values())))


def l2l_meta_grad(
    model: nn.Module, data: tuple[Tensor, Tensor, Tensor, Tensor], lr: float, steps: int, fo: bool
) -> list[Tensor]:
    xs, ys, xq, yq = data
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=fo)
    learner = maml.clone()
    for _ in range(steps):
        learner.adapt(F.mse_loss(learner(xs), ys))
    return list(torch.autograd.grad(F.mse_loss(learner(xq), yq), list(maml.parameters())))


# -- learn2learn's documented behaviour --------------------------------------------------------
def test_public_names_match_learn2learn_layout() -> None:
    assert l2l.MAML is l2l.algorithms.MAML
    assert l2l.MetaSGD is l2l.algorithms.MetaSGD
    assert l2l.clone_module is l2l.utils.clone_module
    assert l2l.update_module is l2l.utils.update_module


def test_clone_equals_original_in_train_and_eval() -> None:
    model = mlp()
    maml = l2l.algorithms.MAML(model, lr=0.1)
    x = torch.randn(5, 2, dtype=DT)
    learner = maml.clone()
    torch.testing.assert_close(learner(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(maml(x), model(x), rtol=0, atol=0)
    maml.eval()
    torch.testing.assert_close(maml.clone()(x), model(x), rtol=0, atol=0)


def test_first_order_matches_manual_reference() -> None:
    model, data = mlp(), task()
    got = l2l_meta_grad(model, data, lr=0.3, steps=2, fo=True)
    want = manual_meta_grad(model, data, lr=0.3, steps=2, order=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_second_order_matches_manual_create_graph_reference() -> None:
    model, data = mlp(), task()
    got = l2l_meta_grad(model, data, lr=0.3, steps=3, fo=False)
    want = manual_meta_grad(model, data, lr=0.3, steps=3, order=2)
    first = manual_meta_grad(model, data, lr=0.3, steps=3, order=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert any((w - f).abs().max() > 1e-6 for w, f in zip(want, first)), "Hessian term missing"


def test_adapt_first_order_flag_overrides_constructor() -> None:
    model, data = mlp(), task()
    xs, ys, xq, yq = data
    maml = l2l.algorithms.MAML(model, lr=0.3)
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(xs), ys), first_order=True)
    got = torch.autograd.grad(F.mse_loss(learner(xq), yq), list(maml.parameters()))
    want = manual_meta_grad(model, data, lr=0.3, steps=1, order=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_second_order_matches_metagrad_maml_meta_grad() -> None:
    model, lr, steps, tasks = mlp(), 0.2, 2, [task(seed=s) for s in range(3)]
    maml = l2l.algorithms.MAML(model, lr=lr)
    total = torch.zeros((), dtype=DT)
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.mse_loss(learner(xs), ys))
        total = total + F.mse_loss(learner(xq), yq)
    (total / len(tasks)).backward()
    xs, ys, xq, yq = (torch.stack(t) for t in zip(*tasks))
    ref = MetagradMAML(model, F.mse_loss, inner_lr=lr, inner_steps=steps, order=2)
    want = ref.meta_grad(xs, ys, xq, yq)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[f"module.{name}"], rtol=1e-10, atol=1e-12)


class Quadratic(nn.Module):
    """``forward(A) = 1/2 theta^T A theta``: the inner Hessian is ``A``."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, a: Tensor) -> Tensor:
        return 0.5 * self.theta @ a @ self.theta


def test_one_step_closed_form_on_quadratic() -> None:
    n, alpha = 4, 0.1
    m = torch.randn(n, n, dtype=DT)
    a = m @ m.T + torch.eye(n, dtype=DT)
    c = torch.randn(n, dtype=DT)
    model = Quadratic(torch.randn(n, dtype=DT))
    maml = l2l.MAML(model, lr=alpha)
    learner = maml.clone()
    learner.adapt(learner(a))
    (0.5 * (learner.theta - c).pow(2).sum()).backward()
    theta = model.theta.detach()
    adapted = theta - alpha * a @ theta
    want = (torch.eye(n, dtype=DT) - alpha * a) @ (adapted - c)
    torch.testing.assert_close(model.theta.grad, want, rtol=1e-12, atol=1e-12)


def test_every_parameter_gets_a_nonzero_meta_gradient() -> None:
    model, (xs, ys, xq, yq) = mlp(), task()
    maml = l2l.algorithms.MAML(model, lr=0.1)
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(xs), ys))
    F.mse_loss(learner(xq), yq).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adaptation_lowers_the_loss_and_leaves_model_untouched() -> None:
    model, (xs, ys, _, _) = mlp(), task()
    before = copy.deepcopy(model.state_dict())
    learner = l2l.algorithms.MAML(model, lr=0.2).clone()
    losses = []
    for _ in range(5):
        loss = F.mse_loss(learner(xs), ys)
        losses.append(loss.item())
        learner.adapt(loss)
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and model.get_parameter(k).is_leaf


def test_parameters_root_versus_clone() -> None:
    model = mlp()
    maml = l2l.algorithms.MAML(model, lr=0.1)
    assert [id(p) for p in maml.parameters()] == [id(p) for p in model.parameters()]
    assert list(maml.state_dict()) == [f"module.{k}" for k in model.state_dict()]
    learner = maml.clone()
    xs, ys, _, _ = task()
    learner.adapt(F.mse_loss(learner(xs), ys))
    names = [n for n, _ in learner.named_parameters()]
    assert names == [f"module.{k}" for k, _ in model.named_parameters()]
    fast = list(learner.parameters())
    assert all(not p.is_leaf for p in fast)
    assert not torch.equal(fast[0], model[0].weight)
    # .module and attribute fall-through see the fast weights, as learn2learn's clone does.
    torch.testing.assert_close(learner.module[0].weight, fast[0])
    torch.testing.assert_close(learner.module(xs), learner(xs))
    assert learner.module is not model and type(learner.module) is type(model)


def test_clone_of_clone_keeps_graph() -> None:
    model, (xs, ys, xq, yq) = mlp(), task()
    maml = l2l.algorithms.MAML(model, lr=0.3)
    outer = maml.clone()
    outer.adapt(F.mse_loss(outer(xs), ys))
    inner = outer.clone()
    inner.adapt(F.mse_loss(inner(xs), ys))
    got = torch.autograd.grad(F.mse_loss(inner(xq), yq), list(maml.parameters()))
    want = manual_meta_grad(model, (xs, ys, xq, yq), lr=0.3, steps=2, order=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_clone_mode_is_its_own() -> None:
    model = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.5), nn.Linear(16, 1)).to(DT)
    learner = l2l.MAML(model, lr=0.1).clone()
    x = torch.randn(8, 2, dtype=DT)
    learner.eval()
    torch.testing.assert_close(learner(x), model.eval()(x))
    assert model.training is False
    model.train()
    learner.train()
    assert not torch.equal(learner(x), learner(x))  # dropout active again


# -- allow_unused / allow_nograd ---------------------------------------------------------------
class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(2, 1)
        self.unused = nn.Linear(2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def test_unused_parameter_raises_naming_it_and_the_flag() -> None:
    xs, ys, _, _ = task()
    learner = l2l.MAML(WithUnused().to(DT), lr=0.1).clone()
    with pytest.raises(ValueError, match=r"l2l\.MAML\.adapt.*unused\.weight.*allow_unused=True"):
        learner.adapt(F.mse_loss(learner(xs), ys))


@pytest.mark.parametrize("where", ["constructor", "clone", "adapt"])
def test_allow_unused_leaves_unused_parameter_unadapted(where: str) -> None:
    model, (xs, ys, xq, yq) = WithUnused().to(DT), task()
    maml = l2l.MAML(model, lr=0.1, allow_unused=where == "constructor")
    learner = maml.clone(allow_unused=True) if where == "clone" else maml.clone()
    loss = F.mse_loss(learner(xs), ys)
    learner.adapt(loss, allow_unused=True) if where == "adapt" else learner.adapt(loss)
    fast = dict(learner.named_parameters())
    torch.testing.assert_close(fast["module.unused.weight"], model.unused.weight)
    assert not torch.equal(fast["module.used.weight"], model.used.weight)
    F.mse_loss(learner(xq), yq).backward()
    assert model.used.weight.grad is not None


def test_frozen_parameter_raises_unless_allow_nograd() -> None:
    model, (xs, ys, xq, yq) = mlp(), task()
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0\.bias'\].*requires_grad=False.*allow_nograd=True"):
        learner = l2l.MAML(model, lr=0.1).clone()
        learner.adapt(F.mse_loss(learner(xs), ys))
    maml = l2l.MAML(model, lr=0.1, allow_nograd=True)
    assert maml.allow_unused is True  # learn2learn: allow_unused defaults to allow_nograd
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(xs), ys))
    fast = dict(learner.named_parameters())
    assert torch.equal(fast["module.0.bias"], model[0].bias)
    assert not fast["module.0.bias"].requires_grad
    F.mse_loss(learner(xq), yq).backward()
    assert model[0].bias.grad is None and model[0].weight.grad is not None


# -- MetaSGD -----------------------------------------------------------------------------------
def test_metasgd_matches_manual_and_rates_get_gradients() -> None:
    model, (xs, ys, xq, yq) = mlp(), task()
    meta = l2l.algorithms.MetaSGD(model, lr=0.3)
    assert [id(p) for p in meta.parameters()] == [
        *(id(p) for p in model.parameters()),
        *(id(a) for a in meta.lrs),
    ]
    learner = meta.clone()
    learner.adapt(F.mse_loss(learner(xs), ys))
    F.mse_loss(learner(xq), yq).backward()

    theta = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    rates = [torch.full_like(p, 0.3).requires_grad_() for p in theta.values()]
    grads = torch.autograd.grad(
        F.mse_loss(functional_call(model, theta, (xs,)), ys),
        list(theta.values()),
        create_graph=True,
    )
    fast = {k: p - a * g for (k, p), a, g in zip(theta.items(), rates, grads)}
    query = F.mse_loss(functional_call(model, fast, (xq,)), yq)
    want = torch.autograd.grad(query, [*theta.values(), *rates])
    got = [p.grad for p in model.parameters()] + [a.grad for a in meta.lrs]
    for g, w in zip(got, want):
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_metasgd_custom_lrs_and_length_check() -> None:
    model = mlp()
    scalars = [nn.Parameter(torch.tensor(0.1, dtype=DT)) for _ in model.parameters()]
    meta = l2l.MetaSGD(model, lrs=scalars)
    assert [id(p) for p in meta.lrs] == [id(p) for p in scalars]
    xs, ys, _, _ = task()
    learner = meta.clone()
    learner.adapt(F.mse_loss(learner(xs), ys))
    with pytest.raises(ValueError, match=r"l2l\.MetaSGD: got 1 learning-rate tensors for 4"):
        l2l.MetaSGD(model, lrs=scalars[:1])


# -- other model kinds -------------------------------------------------------------------------
class GRUHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def test_gru_second_order_matches_manual() -> None:
    model = GRUHead().to(DT)
    g = torch.Generator().manual_seed(1)
    xs, xq = (
        torch.randn(4, 3, 2, generator=g, dtype=DT),
        torch.randn(4, 3, 2, generator=g, dtype=DT),
    )
    ys, yq = torch.randn(4, 1, generator=g, dtype=DT), torch.randn(4, 1, generator=g, dtype=DT)
    maml = l2l.MAML(model, lr=0.5)
    learner = maml.clone()
    torch.testing.assert_close(learner(xs), model(xs), rtol=0, atol=0)
    learner.adapt(F.mse_loss(learner(xs), ys))
    got = torch.autograd.grad(F.mse_loss(learner(xq), yq), list(maml.parameters()))
    want = manual_meta_grad(model, (xs, ys, xq, yq), lr=0.5, steps=1, order=2)
    for a, b in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gru_with_hidden_state_argument() -> None:
    gru = nn.GRU(2, 3).to(DT)
    learner = l2l.MAML(gru, lr=0.1).clone()
    x, h0 = torch.randn(4, 2, 2, dtype=DT), torch.randn(1, 2, 3, dtype=DT)
    out, h = learner(x, h0)
    ref_out, ref_h = gru(x, h0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    learner.adapt(h.pow(2).sum())
    assert not torch.equal(learner(x, hx=h0)[1], ref_h)


class Scaled(nn.Module):
    """A model whose forward reads a registered (non-trainable) buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("scale", torch.tensor([2.0, -0.5]))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x * self.scale)


def test_registered_buffer_model() -> None:
    model, data = Scaled().to(DT), task()
    learner = l2l.MAML(model, lr=0.2).clone()
    torch.testing.assert_close(learner(data[0]), model(data[0]), rtol=0, atol=0)
    got = l2l_meta_grad(model, data, lr=0.2, steps=2, fo=False)
    want = manual_meta_grad(model, data, lr=0.2, steps=2, order=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.scale, torch.tensor([2.0, -0.5], dtype=DT))


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).to(DT)


def test_batchnorm_running_stats_not_mutated_by_inner_loop() -> None:
    model, (xs, ys, xq, yq) = bn_model(), task(n=8)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.named_buffers()}
    reference = copy.deepcopy(model)  # learn2learn's train-mode outputs: batch statistics
    maml = l2l.MAML(model, lr=0.1)
    learner = maml.clone()
    torch.testing.assert_close(learner(xs), reference(xs), rtol=0, atol=0)
    for _ in range(3):
        learner.adapt(F.mse_loss(learner(xs), ys))
    F.mse_loss(learner(xq), yq).backward()
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is not None for p in model.parameters())
    # Eval mode reads the model's own running statistics.
    maml.eval()
    torch.testing.assert_close(maml.clone()(xq), model(xq), rtol=0, atol=0)


def test_inplace_error_is_translated() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.sigmoid(self.lin(x))
            h += 1.0  # overwrites sigmoid's saved output
            return h

    learner = l2l.MAML(InPlace().to(DT), lr=0.1).clone()
    xs, ys, _, _ = task()
    with pytest.raises(RuntimeError, match=r"l2l\.MAML\.adapt: the model's forward modifies"):
        learner.adapt(F.mse_loss(learner(xs), ys))


# -- misuse ------------------------------------------------------------------------------------
def test_errors_name_method_and_fix() -> None:
    model, (xs, ys, _, _) = mlp(), task()
    maml = l2l.MAML(model, lr=0.1)
    with pytest.raises(ValueError, match=r"l2l\.MAML\.adapt: called on the wrapper.*clone\(\)"):
        maml.adapt(F.mse_loss(maml(xs), ys))
    learner = maml.clone()
    with pytest.raises(ValueError, match="scalar"):
        learner.adapt((learner(xs) - ys).pow(2))
    with torch.no_grad():
        detached = F.mse_loss(learner(xs), ys)
    with pytest.raises(ValueError, match="does not depend on the clone"):
        learner.adapt(detached)
    with torch.no_grad(), pytest.raises(ValueError, match=r"gradients are disabled"):
        learner.adapt(F.mse_loss(learner(xs), ys))
    with pytest.raises(ValueError, match="from the clone's output"):
        learner.adapt(F.mse_loss(maml(xs), ys))
    with pytest.raises(TypeError, match="lr="):
        l2l.MAML(model, lr="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bn="):
        l2l.MAML(model, lr=0.1, bn="batch")


@settings(max_examples=8, deadline=None)
@given(
    width=st.integers(1, 6),
    steps=st.integers(0, 3),
    lr=st.floats(0.01, 0.5),
    seed=st.integers(0, 2**16),
)
def test_property_second_order_matches_manual(width: int, steps: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    model, data = mlp(width), task(seed=seed)
    got = l2l_meta_grad(model, data, lr=lr, steps=steps, fo=False)
    want = manual_meta_grad(model, data, lr=lr, steps=steps, order=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# -- learn2learn's sinusoid example, only the import changed -----------------------------------
def test_sinusoid_maml_loop_reduces_meta_loss() -> None:
    shots, tasks_per_batch, adapt_steps, iterations = 10, 4, 1, 25
    g = torch.Generator().manual_seed(0)

    def sample_batch() -> tuple[Tensor, Tensor]:
        amp = 0.1 + 4.9 * torch.rand(tasks_per_batch, 1, 1, generator=g, dtype=DT)
        phase = math.pi * torch.rand(tasks_per_batch, 1, 1, generator=g, dtype=DT)
        x = 10 * torch.rand(tasks_per_batch, 2 * shots, 1, generator=g, dtype=DT) - 5
        return x, amp * torch.sin(x - phase)

    model = SineModel(dim=20).to(DT)
    maml = l2l.algorithms.MAML(model, lr=0.01, first_order=False, allow_unused=True)
    opt = torch.optim.Adam(maml.parameters(), 1e-2)
    lossfn = nn.MSELoss(reduction="mean")

    def meta_loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        meta_train_loss = torch.zeros((), dtype=DT)
        for i in range(tasks_per_batch):
            learner = maml.clone()
            x_support, y_support = batch[0][i][::2], batch[1][i][::2]
            x_query, y_query = batch[0][i][1::2], batch[1][i][1::2]
            for _ in range(adapt_steps):
                learner.adapt(lossfn(learner(x_support), y_support))
            meta_train_loss = meta_train_loss + lossfn(learner(x_query), y_query)
        return meta_train_loss / tasks_per_batch

    validation = [sample_batch() for _ in range(2)]
    before = sum(meta_loss(b).item() for b in validation)
    for _ in range(iterations):
        meta_train_loss = meta_loss(sample_batch())
        opt.zero_grad()
        meta_train_loss.backward()
        opt.step()
    after = sum(meta_loss(b).item() for b in validation)
    assert after < 0.9 * before


def test_docstring_examples_run() -> None:
    for mod in (maml_impl, clone_impl):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, mod.__name__


def test_metasgd_unused_parameter_error_and_extension_flag() -> None:
    xs, ys, _, _ = task()
    learner = l2l.MetaSGD(WithUnused().to(DT), lr=0.1).clone()
    with pytest.raises(
        ValueError, match=r"l2l\.MetaSGD\.adapt.*unused\.bias.*constructor or adapt"
    ):
        learner.adapt(F.mse_loss(learner(xs), ys))
    learner.adapt(F.mse_loss(learner(xs), ys), allow_unused=True)
    fast = dict(learner.named_parameters())
    assert torch.equal(fast["module.unused.weight"], learner.module.unused.weight)
    assert not torch.equal(fast["module.used.weight"], learner.lrs[0])


def test_clone_structure_is_private_to_the_clone() -> None:
    # A clone runs its own structural copy of the model: hooks registered on it stay there.
    maml = l2l.algorithms.MAML(mlp(), lr=0.1)
    a, b = maml.clone(), maml.clone()
    calls: list[int] = []
    a.module[0].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 2, dtype=DT)
    b(x), maml(x), maml.clone()(x)
    assert calls == []
    a(x)
    assert calls == [1]
    # The copy follows the clone through adapt (no stale reference).
    view = a.module
    a.adapt(a(x).pow(2).mean())
    assert view is a.module
    assert torch.equal(view[0].weight, dict(a.named_parameters())["module.0.weight"])
    assert not any(isinstance(p, nn.Parameter) for p in view.parameters())
