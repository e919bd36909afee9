"""Learning to reweight: the weights equal the closed form, noisy labels get less, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metagrad.workloads import (
    ReweightConfig,
    Split,
    example_weights,
    forward,
    init_mlp,
    lookahead_problem,
    symmetric_noise,
    train_plain,
    train_reweighted,
)

D = torch.float64


def blobs(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Split:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], dtype=dtype)
    return Split(centers[y] + 0.5 * torch.randn(n, 2, generator=g, dtype=dtype), y)


def test_weights_are_the_clipped_normalized_gradient_alignment() -> None:
    train, clean = blobs(12, 0, D), blobs(9, 1, D)
    w = init_mlp((2, 5, 3), seed=0, dtype=D)
    lr = 0.3
    u = example_weights(lookahead_problem(lr), w, train, clean)
    # independent: u_i = lr * grad(clean loss) . grad(loss_i), clipped at 0, normalized
    leaves = {k: v.clone().requires_grad_() for k, v in w.items()}
    gc = torch.autograd.grad(
        F.cross_entropy(forward(leaves, clean.x), clean.y), list(leaves.values())
    )
    ref = []
    for i in range(12):
        li = F.cross_entropy(forward(leaves, train.x[i : i + 1]), train.y[i : i + 1])
        gi = torch.autograd.grad(li, list(leaves.values()))
        ref.append(lr * sum((a * b).sum() for a, b in zip(gc, gi)))
    r = torch.clamp(torch.stack(ref), min=0)
    # (torch.testing.assert_close would import torch.distributed: seconds)
    assert float((u - r / r.sum()).abs().max()) < 1e-12


def test_mislabelled_examples_get_less_weight() -> None:
    train, clean = blobs(120, 0), blobs(30, 1)
    w = train_plain(clean, ReweightConfig(hidden=(8,), epochs=20, batch_size=10, lr=0.1), seed=0)
    noisy_y = symmetric_noise(train.y, 0.5, n_classes=3, seed=0)
    u = example_weights(lookahead_problem(0.1), w, (train.x, noisy_y), clean)
    wrong = noisy_y != train.y
    assert float(u[wrong].mean()) < 0.25 * float(u[~wrong].mean())


def test_all_weights_clipped_gives_a_zero_step_not_nan() -> None:
    train, clean = blobs(6, 0), blobs(6, 1)
    w = train_plain(clean, ReweightConfig(hidden=(8,), epochs=30, batch_size=6, lr=0.1), seed=0)
    wrong = (train.y + 1) % 3  # every label wrong
    u = example_weights(lookahead_problem(0.1), w, (train.x, wrong), clean)
    assert torch.isfinite(u).all() and float(u.sum()) in (0.0, pytest.approx(1.0))


def test_reweighted_training_runs_and_returns_parameters() -> None:
    train, clean = blobs(40, 0), blobs(6, 1)
    w = train_reweighted(train, clean, ReweightConfig(hidden=(8,), epochs=2, batch_size=20))
    assert sorted(w) == ["l0.bias", "l0.weight", "l1.bias", "l1.weight"]
    assert all(not v.requires_grad for v in w.values())


def test_empty_clean_set_is_a_clear_error() -> None:
    train = blobs(20, 0)
    empty = Split(train.x[:0], train.y[:0])
    with pytest.raises(
        ValueError,
        match=r"train_reweighted: the clean set has 0 inputs and 0 labels.*few clean examples per class",
    ):
        train_reweighted(train, empty)
    with pytest.raises(ValueError, match=r"train_plain: the training set has 0 inputs"):
        train_plain(empty)
