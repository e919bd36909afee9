"""FunctionalModel: a pure view of the user's module that never writes to it."""

from __future__ import annotations

import pytest
import torch
from meta_helpers import MODELS, assert_unchanged, snapshot
from reference import batch_statistics_copy
from torch import nn

from metagrad.functional import FunctionalModel
from metagrad.functional._model import norm_module_names, select_names


@pytest.mark.parametrize(
    ("kind", "safe"),
    [("mlp", True), ("conv_bn", False), ("conv_gn", False), ("mlp_ln", False), ("gru", False)],
)
def test_vmap_safe_classification(kind: str, safe: bool) -> None:
    assert FunctionalModel.from_module(MODELS[kind]()).vmap_safe() is safe


@pytest.mark.parametrize("bn", ["transductive", "running"])
@pytest.mark.parametrize("train", [True, False])
def test_forward_is_pure_and_matches_policy(bn: str, train: bool) -> None:
    model = MODELS["conv_bn"]()
    with torch.no_grad():
        model(torch.randn(6, 1, 8, 8, dtype=torch.float64) + 2)  # non-default running stats
    model.train(train)
    before = snapshot(model)
    fm = FunctionalModel.from_module(model, bn)
    fm.sync_modes()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    out = fm.forward(fm.params(), fm.buffers(), x)
    assert_unchanged(model, before)
    if bn == "transductive" or train:
        ref = batch_statistics_copy(model)
    else:
        ref = model
    with torch.no_grad():
        want = ref(x)
    assert_unchanged(model, before)
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


def test_batch_statistics_copy_is_manual_batch_norm() -> None:
    """The reference's BN semantics: (x - mean) / sqrt(biased var + eps) * w + b per channel."""
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
        bn.running_mean.fill_(5.0)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
    assert torch.allclose(batch_statistics_copy(bn)(x), want, rtol=1e-12, atol=1e-12)


def test_frozen_parameters_are_constants() -> None:
    model = MODELS["mlp"]()
    model[0].weight.requires_grad_(False)
    fm = FunctionalModel.from_module(model)
    assert "0.weight" in fm.frozen and "0.weight" not in fm.params()
    x = torch.randn(3, 1, dtype=torch.float64)
    out = fm.forward(fm.params(), fm.buffers(), x)
    assert torch.equal(out, model(x))
    params = fm.params()
    out = fm.forward(params, fm.buffers(), x)
    (got,) = torch.autograd.grad(out.sum(), params["2.weight"])
    # d sum(W4 tanh(W2 h1 + b2) + b4) / dW2 = ((1 - tanh(z2)^2) * W4)^T h1, by hand
    with torch.no_grad():
        h1 = torch.tanh(x @ model[0].weight.T + model[0].bias)
        z2 = h1 @ model[2].weight.T + model[2].bias
        want = ((1 - torch.tanh(z2) ** 2) * model[4].weight).T @ h1
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_buffers_are_clones() -> None:
    model = MODELS["conv_bn"]()
    fm = FunctionalModel.from_module(model, "running")
    buf = fm.buffers()
    buf["1.running_mean"].add_(1.0)
    assert torch.equal(model[1].running_mean, torch.zeros(4, dtype=torch.float64))


def test_select_names_and_norm_names() -> None:
    names = ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    assert select_names(names, "head", "f", "adapt") == ["head.weight", "head.bias"]
    assert select_names(names, ["body.0", "head.bias"], "f", "adapt") == [
        "body.0.weight",
        "body.0.bias",
        "head.bias",
    ]
    assert select_names(names, lambda n: n.endswith("bias"), "f", "adapt") == [
        "body.0.bias",
        "head.bias",
    ]
    assert select_names(names, None, "f", "adapt") == names
    # "head" must not select "header.weight": prefixes are module boundaries.
    with pytest.raises(ValueError, match=r"f: adapt=\['hea'\] matches no trainable parameter"):
        select_names(names, "hea", "f", "adapt")
    assert norm_module_names(MODELS["conv_bn"]()) == ["1", "5"]
