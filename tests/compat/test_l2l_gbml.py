"""``l2l.algorithms.GBML``, ``l2l.optim`` transforms, ``l2l.nn`` layers and the small utils.

References: metagrad's compat ``MetaSGD`` (GBML with ``Scale`` is Meta-SGD), an unrolled
float64 computation with plain ``torch.autograd.grad``, closed forms of the transforms.
"""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad.compat._l2l_gbml as gbml_impl
import metagrad.compat._l2l_nn as nn_impl
import metagrad.compat._l2l_optim as optim_impl
import metagrad.compat._l2l_utils as utils_impl
import metagrad.compat.learn2learn as l2l

DT = torch.float64


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def data(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)
    return xs, torch.sin(xs.sum(1, keepdim=True)), xq, torch.sin(xq.sum(1, keepdim=True))


def scale_transform(p: torch.Tensor) -> nn.Module:
    scale = l2l.nn.Scale(tuple(p.shape)).to(DT)
    with torch.no_grad():
        scale.alpha.fill_(0.1)  # exactly 0.1 in float64, as the references
    return scale


def test_gbml_with_scale_is_metasgd() -> None:
    xs, ys, xq, yq = data()
    model_a, model_b = net(), net()
    gbml = l2l.algorithms.GBML(model_a, scale_transform, lr=1.0)
    meta = l2l.algorithms.MetaSGD(model_b, lr=0.1)
    outs = []
    for wrapper in (gbml, meta):
        learner = wrapper.clone()
        for _ in range(2):
            learner.adapt(F.mse_loss(learner(xs), ys))
        F.mse_loss(learner(xq), yq).backward()
        outs.append(learner(xq))
    torch.testing.assert_close(outs[0], outs[1])
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    alphas = [m.alpha.grad for m in gbml.compute_update.transforms_modules]
    for ga, gb in zip(alphas, [r.grad for r in meta.lrs]):
        torch.testing.assert_close(ga, gb)


def test_gbml_adapt_transform_matches_unrolled_reference() -> None:
    xs, ys, xq, yq = data(2)
    model = net()
    gbml = l2l.algorithms.GBML(model, scale_transform, lr=0.5, adapt_transform=True)
    learner = gbml.clone()
    for _ in range(2):
        learner.adapt(F.mse_loss(learner(xs), ys))
    got = torch.autograd.grad(F.mse_loss(learner(xq), yq), list(gbml.parameters()))
    # Reference: step 1 moves theta; step 2 first moves alpha (through theta_1), then theta.
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    alpha = [torch.full_like(p, 0.1, requires_grad=True) for p in theta]

    def f(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ params[0].t() + params[1])
        return h @ params[2].t() + params[3]

    g0 = torch.autograd.grad(F.mse_loss(f(theta, xs), ys), theta, create_graph=True)
    th1 = [t - 0.5 * a * g for t, a, g in zip(theta, alpha, g0)]
    loss1 = F.mse_loss(f(th1, xs), ys)
    ga = torch.autograd.grad(loss1, alpha, create_graph=True, retain_graph=True)
    al1 = [a - 0.5 * g for a, g in zip(alpha, ga)]
    g1 = torch.autograd.grad(loss1, th1, create_graph=True)
    th2 = [t - 0.5 * a * g for t, a, g in zip(th1, al1, g1)]
    want = torch.autograd.grad(F.mse_loss(f(th2, xq), yq), theta + alpha)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gbml_flags_and_errors() -> None:
    xs, ys, _, _ = data()
    model = net()
    gbml = l2l.algorithms.GBML(model, scale_transform, lr=1.0)
    with pytest.raises(ValueError, match=r"GBML.adapt: called on the wrapper.*gbml.clone\(\)"):
        gbml.adapt(F.mse_loss(gbml(xs), ys))
    model[0].bias.requires_grad_(False)
    frozen = l2l.algorithms.GBML(model, scale_transform, lr=1.0)
    with pytest.raises(ValueError, match=r"positions \[1\] have requires_grad=False.*allow_nograd"):
        learner = frozen.clone()
        learner.adapt(F.mse_loss(learner(xs), ys))
    learner = frozen.clone(allow_nograd=True)
    learner.adapt(F.mse_loss(learner(xs), ys))
    assert torch.equal(learner.module[0].bias, model[0].bias)  # left as is
    first = l2l.algorithms.GBML(net(), scale_transform, first_order=True).clone()
    first.adapt(F.mse_loss(first(xs), ys))
    assert first.first_order
    with pytest.raises(TypeError, match="unexpected arguments"):
        l2l.algorithms.GBML(net(), scale_transform, nonsense=1)


def test_parameter_update_unused_and_transform_contract() -> None:
    lin, other = nn.Linear(2, 1).to(DT), nn.Linear(2, 1).to(DT)
    params = list(lin.parameters()) + list(other.parameters())
    upd = l2l.optim.ParameterUpdate(params, lambda p: None)
    loss = lin(torch.ones(1, 2, dtype=DT)).sum()
    with pytest.raises(ValueError, match=r"positions \[2, 3\] do not reach the loss"):
        upd(loss, params, retain_graph=True)
    out = upd(loss, params, allow_unused=True)
    assert out[2] is None and out[3] is None and torch.equal(out[1], torch.ones(1, dtype=DT))
    with pytest.raises(ValueError, match=r"must return an nn\.Module or None"):
        l2l.optim.ParameterUpdate(params, lambda p: 3)
    with pytest.raises(ValueError, match="got 1 parameters but the update was built for 4"):
        upd(loss, params[:1])
    named = l2l.optim.ParameterUpdate(
        lin.named_parameters(), lambda name, p: None, pass_param_names=True
    )
    assert named.transforms_indices == [None, None]


def test_metacurvature_identity_start_and_factor_axes() -> None:
    torch.manual_seed(0)
    for shape in ((4,), (3, 4), (3, 2, 3, 3)):
        p = torch.zeros(shape, dtype=torch.float32)
        t = l2l.optim.transforms.MetaCurvatureTransform(p, lr=0.5)
        g = torch.randn(shape)
        torch.testing.assert_close(t(g), 0.5 * g)
    g = torch.randn(3, 2, 3, 3)
    t = l2l.optim.MetaCurvatureTransform(g)
    A, B, C = torch.randn(3, 3), torch.randn(2, 2), torch.randn(9, 9)
    with torch.no_grad():
        t.mc_in.copy_(A)
    torch.testing.assert_close(t(g), torch.einsum("ia,abhw->ibhw", A, g))
    with torch.no_grad():
        t.mc_in.copy_(torch.eye(3))
        t.mc_out.copy_(B)
    torch.testing.assert_close(t(g), torch.einsum("abhw,bj->ajhw", g, B))
    with torch.no_grad():
        t.mc_out.copy_(torch.eye(2))
        t.mc_f.copy_(C)
    want = torch.einsum("fk,abk->abf", C, g.reshape(3, 2, 9)).reshape(g.shape)
    torch.testing.assert_close(t(g), want)
    lin = l2l.optim.MetaCurvatureTransform(torch.zeros(3, 2))
    with torch.no_grad():
        lin.mc_in.copy_(A)
        lin.mc_out.copy_(B)
    g2 = torch.randn(3, 2)
    torch.testing.assert_close(lin(g2), A @ g2 @ B)
    with pytest.raises(ValueError, match="not supported"):
        l2l.optim.MetaCurvatureTransform(torch.zeros(2, 2, 2))


def test_kronecker_linear_is_a_kronecker_product() -> None:
    torch.manual_seed(0)
    k = l2l.nn.KroneckerLinear(3, 2, bias=True)
    with torch.no_grad():
        k.left.copy_(torch.randn(3, 3))
        k.right.copy_(torch.randn(2, 2))
        k.bias.copy_(torch.randn(3, 2))
    x = torch.randn(6)
    # vec is column-major: vec(L X R) = (R^T kron L) vec(X)
    want = torch.kron(k.right.t().contiguous(), k.left) @ x + k.bias.t().reshape(-1)
    torch.testing.assert_close(k(x), want)
    X = x.reshape(2, 3).t()
    torch.testing.assert_close(k(X), k.left @ X @ k.right + k.bias)
    with pytest.raises(ValueError, match="expected n \\* m = 6"):
        k(torch.randn(5))
    psd = l2l.nn.KroneckerLinear(2, 2, bias=False, psd=True)
    torch.testing.assert_close(psd(torch.eye(2)), torch.eye(2))


def test_kronecker_and_module_transforms_through_gbml() -> None:
    xs, ys, xq, yq = data()
    kfo = l2l.optim.transforms.KroneckerTransform(l2l.nn.KroneckerLinear)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    gbml = l2l.algorithms.GBML(model, kfo, lr=0.1)
    learner = gbml.clone()
    learner.adapt(F.mse_loss(learner(xs.float()), ys.float()))
    F.mse_loss(learner(xq.float()), yq.float()).backward()
    grads = [p.grad for p in gbml.compute_update.parameters()]
    assert len(grads) == 8 and all(g is not None for g in grads)
    # Identity-initialized factors: the first step is plain SGD.
    plain = l2l.algorithms.MAML(model, lr=0.1).clone()
    plain.adapt(F.mse_loss(plain(xs.float()), ys.float()))
    torch.testing.assert_close(learner(xq.float()), plain(xq.float()))
    lin_t = l2l.optim.ModuleTransform(nn.Linear)(torch.zeros(2, 3))
    assert lin_t(torch.ones(2, 3)).shape == (2, 3)


def test_transform_dictionary_only_for_listed_modules() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    td = l2l.optim.transforms.TransformDictionary({model[2]: scale_transform})
    upd = l2l.optim.ParameterUpdate(model.parameters(), td)
    assert upd.transforms_indices == [None, None, 0, 1]
    with pytest.raises(ValueError, match=r"keys must be nn\.Modules or nn\.Parameters"):
        l2l.optim.TransformDictionary({"head": scale_transform})


def test_differentiable_sgd_keeps_the_graph() -> None:
    model = nn.Linear(2, 1).to(DT)
    clone = l2l.clone_module(model)
    loss = clone(torch.ones(3, 2, dtype=DT)).pow(2).mean()
    grads = torch.autograd.grad(loss, list(clone.parameters()), create_graph=True)
    l2l.optim.DifferentiableSGD(lr=0.1)(clone, list(grads))
    clone(torch.ones(3, 2, dtype=DT)).sum().backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_detach_module_cuts_the_graph() -> None:
    model = net()
    clone = l2l.clone_module(model)
    l2l.detach_module(clone)
    assert all(not p.requires_grad and p.grad_fn is None for p in clone.parameters())
    kept = l2l.clone_module(model)
    l2l.detach_module(kept, keep_requires_grad=True)
    kept(torch.ones(1, 3, dtype=DT)).sum().backward()
    assert model[0].weight.grad is None and kept[0].weight.grad is not None
    xs, ys, _, _ = data()
    for wrapper in (l2l.MAML(net(), lr=0.1), l2l.MetaSGD(net(), lr=0.1)):
        learner = wrapper.clone()
        learner.adapt(F.mse_loss(learner(xs), ys))
        l2l.detach_module(learner)
        out = learner(xs)
        assert not out.requires_grad
        assert all(p.grad_fn is None for p in learner.parameters())
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        l2l.detach_module([1])


def test_accuracy_magic_box_and_layers() -> None:
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert float(l2l.utils.accuracy(preds, torch.tensor([1, 1, 1]))) == pytest.approx(2 / 3)
    assert l2l.accuracy is l2l.utils.accuracy
    with pytest.raises(ValueError, match=r"predictions must be \[N, classes\]"):
        l2l.utils.accuracy(preds[0], torch.tensor([1]))
    x = torch.tensor([0.5, -1.0], requires_grad=True)
    box = l2l.magic_box(x)
    assert torch.equal(box, torch.ones(2))
    assert torch.equal(torch.autograd.grad(box.sum(), x)[0], torch.ones(2))
    assert l2l.magic_box(3) == 3
    assert l2l.nn.Flatten()(torch.ones(2, 3, 4)).shape == (2, 12)
    assert l2l.nn.Lambda(lambda a, b: a + b)(1, b=2) == 3
    assert l2l.nn.Scale()(torch.ones(3)).shape == (3,)


def test_docstring_examples_run() -> None:
    for mod in (gbml_impl, nn_impl, optim_impl, utils_impl):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
