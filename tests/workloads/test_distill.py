"""Dataset distillation: exact hypergradient in the images, a run, the PNG grid, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from metagrad import bilevel
from metagrad.workloads import (
    DistillConfig,
    Split,
    distill,
    distill_problem,
    evaluate_distilled,
    init_mlp,
    save_image_grid,
    train_on,
)

D = torch.float64


def data(dtype: torch.dtype = torch.float32) -> Split:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.nn.functional.one_hot(y, 4).to(dtype) + 0.3 * torch.randn(
        60, 4, generator=g, dtype=dtype
    )
    return Split(x, y)


def test_hypergradient_in_images_and_step_sizes_matches_finite_differences() -> None:
    train = data(D)
    cfg = DistillConfig(hidden=(5,), inner_steps=3)
    pb = distill_problem(cfg)
    w0 = init_mlp((4, 5, 3), seed=0, dtype=D)
    g = torch.Generator().manual_seed(1)
    h = {
        "images": torch.rand(3, 4, generator=g, dtype=D).requires_grad_(),
        "log_lr": torch.full((3,), math.log(0.5), dtype=D).requires_grad_(),
    }
    labels = torch.arange(3)
    res = bilevel.hypergrad(pb, w0, h, labels, (train.x, train.y))

    def G(key: str, i: tuple[int, ...], eps: float) -> float:
        hh = {k: v.detach().clone() for k, v in h.items()}
        hh[key][i] += eps
        return float(
            bilevel.hypergrad(pb, w0, hh, labels, (train.x, train.y), need_grad=False).value
        )

    for key, i in (("images", (0, 1)), ("images", (2, 3)), ("log_lr", (0,)), ("log_lr", (2,))):
        fd = (G(key, i, 1e-6) - G(key, i, -1e-6)) / 2e-6
        assert float(res.grads.h[key][i]) == pytest.approx(fd, rel=1e-5, abs=1e-10)


def test_distillation_lowers_the_real_loss_and_trains_unseen_inits() -> None:
    train = data()
    cfg = DistillConfig(
        images_per_class=2, hidden=(8,), inner_steps=3, iterations=40, outer_lr=0.05
    )
    res = distill(train, cfg)
    assert res.images.shape == (6, 4) and res.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert res.lrs.shape == (3,) and bool((res.lrs > 0).all())
    first, last = sum(res.outer_losses[:5]) / 5, sum(res.outer_losses[-5:]) / 5
    assert last < first
    accs = evaluate_distilled(res.images, res.labels, res.lrs, cfg, train, seeds=range(100, 103))
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    w = train_on(res.images, res.labels, res.lrs, cfg, seed=5)
    assert w["l1.weight"].shape == (3, 8)


def test_png_grid_has_one_column_per_class(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = save_image_grid(torch.rand(20, 64), tmp_path / "g.png", n_classes=10, scale=2)
    with Image.open(path) as im:
        assert im.size == (10 * 17 + 1, 2 * 17 + 1) and im.mode == "L"
    with pytest.raises(ValueError, match="save_image_grid: 7 images"):
        save_image_grid(torch.rand(7, 64), tmp_path / "h.png", n_classes=10)


def test_a_budget_of_zero_images_is_a_clear_error() -> None:
    train = data()
    with pytest.raises(
        ValueError,
        match=r"distill: images_per_class=0 gives a distillation budget of 0 images.*images_per_class >= 1",
    ):
        distill(train, DistillConfig(images_per_class=0))
    with pytest.raises(TypeError, match=r"distill: images_per_class=True"):
        distill(train, DistillConfig(images_per_class=True))
    with pytest.raises(ValueError, match=r"distill: inner_steps=0"):
        distill(train, DistillConfig(inner_steps=0))
    with pytest.raises(ValueError, match=r"train_on: images_per_class=0"):
        train_on(
            torch.rand(0, 4),
            torch.zeros(0, dtype=torch.long),
            torch.ones(2),
            DistillConfig(),
            seed=0,
            n_classes=3,
        )
