"""``l2l.clone_module`` / ``l2l.update_module``: differentiable copies and graph-keeping updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad.compat.learn2learn as l2l

DT = torch.float64


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def test_clone_module_same_class_same_output_and_graph() -> None:
    model = net().eval()
    x = torch.randn(5, 3, dtype=DT)
    clone = l2l.clone_module(model)
    assert type(clone) is type(model) and clone is not model
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    for p in clone.parameters():
        assert not p.is_leaf and p.requires_grad
    clone(x).sum().backward()
    ref = net().eval()
    ref.load_state_dict(model.state_dict())
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_clone_module_buffers_are_not_shared() -> None:
    model = net().train()
    before = model[1].running_mean.clone()
    clone = l2l.clone_module(model)
    clone(torch.randn(6, 3, dtype=DT))
    assert torch.equal(model[1].running_mean, before)
    assert not torch.equal(clone[1].running_mean, before)


def test_clone_module_keeps_tied_weights_tied_and_frozen_frozen() -> None:
    a = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(a, nn.Tanh(), a)
    model[0].bias.requires_grad_(False)
    clone = l2l.clone_module(model)
    assert clone[0].weight is clone[2].weight
    assert not clone[0].bias.requires_grad
    (g,) = torch.autograd.grad(clone(torch.ones(2, 3, dtype=DT)).sum(), [a.weight])
    assert g.abs().sum() > 0


def test_clone_module_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"l2l\.clone_module: module must be"):
        l2l.clone_module(torch.zeros(3))  # type: ignore[arg-type]


def test_update_module_with_updates_list_is_manual_sgd() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    clone = l2l.clone_module(model)
    loss = F.mse_loss(clone(x), y)
    grads = torch.autograd.grad(loss, list(clone.parameters()), create_graph=True)
    out = l2l.update_module(clone, updates=[-0.1 * g for g in grads])
    assert out is clone
    for p, q, g in zip(clone.parameters(), model.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g)
    assert F.mse_loss(clone(x), y) < loss
    F.mse_loss(clone(x), y).backward()  # second-order meta-gradient reaches the original
    assert all(p.grad is not None for p in model.parameters())


def test_update_module_uses_update_attributes_and_skips_none() -> None:
    model = nn.Linear(2, 1).to(DT)
    clone = l2l.clone_module(model)
    w, b = clone.weight, clone.bias
    w.update = torch.ones_like(w)  # type: ignore[attr-defined]
    l2l.update_module(clone)
    torch.testing.assert_close(clone.weight, model.weight + 1)
    assert clone.bias is b
    assert w.update is None  # type: ignore[attr-defined]
    l2l.update_module(clone, updates=[None, torch.ones_like(b)])
    torch.testing.assert_close(clone.bias, model.bias + 1)


def test_update_module_rnn_uses_new_weights() -> None:
    gru = nn.GRU(2, 3).to(DT)
    x = torch.randn(4, 2, 2, dtype=DT)
    clone = l2l.clone_module(gru)
    out, _ = clone(x)
    torch.testing.assert_close(out, gru(x)[0], rtol=0, atol=0)
    l2l.update_module(clone, updates=[torch.full_like(p, 0.1) for p in clone.parameters()])
    ref = nn.GRU(2, 3).to(DT)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), gru.parameters()):
            p.copy_(q + 0.1)
    torch.testing.assert_close(clone(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)


def test_update_module_length_mismatch_raises() -> None:
    clone = l2l.utils.clone_module(nn.Linear(2, 1))
    updates: list[Tensor | None] = [None]
    with pytest.raises(ValueError, match=r"l2l\.update_module: got 1 updates for 2 parameters"):
        l2l.utils.update_module(clone, updates=updates)
