r"""Dataset distillation (Wang et al. 2018): a few synthetic images that train a model alone.

The hyperparameters are the synthetic images :math:`\tilde x` (``images_per_class`` per class,
fixed labels :math:`\tilde y`) and one log learning rate per inner step. A freshly initialized
MLP :math:`w_0 \sim p(w_0)` takes ``K`` gradient steps on the synthetic set only, and the outer
objective is the loss of the result on a batch of real training images:

.. math::
    w_{k+1} = w_k - e^{a_k} \nabla_w \mathrm{CE}(w_k; \tilde x, \tilde y),\qquad
    \min_{\tilde x, a}\ \mathbb{E}_{w_0}\, \mathrm{CE}(w_K; x_{real}, y_{real}),

differentiated through the ``K`` steps by :func:`metagrad.bilevel.hypergrad` (a new random
initialization every iteration, so the images work for unseen initializations). The score is
the test accuracy of models trained from unseen initializations on the synthetic images alone.

References:
    Wang, Zhu, Torralba, Efros. Dataset Distillation. arXiv:1811.10959, 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import bilevel, optim
from metagrad._typing import Params
from metagrad.workloads._data import IMAGE_SIDE, Split
from metagrad.workloads._model import accuracy, forward, init_mlp
from metagrad.workloads._stepper import Stepper

_FN = "metagrad.workloads.distill"


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run.

    Args:
        images_per_class: synthetic images per class (the budget is this times the classes).
        hidden: hidden layer widths of the MLP trained on them.
        inner_steps: gradient steps on the synthetic set (each uses all synthetic images).
        init_lr: initial learning rate of every inner step (learned, log scale).
        iterations: outer steps (one hypergradient each).
        outer_lr: Adam step size on the images and the log learning rates.
        outer_batch: real training images in each outer objective.
        strategy: the :func:`metagrad.bilevel.hypergrad` strategy.
    """

    images_per_class: int = 1
    hidden: tuple[int, ...] = (64,)
    inner_steps: int = 10
    init_lr: float = 0.1
    iterations: int = 1000
    outer_lr: float = 0.03
    outer_batch: int = 256
    strategy: str = "auto"


@dataclass
class Distilled:
    """The learned synthetic set: images ``[M, D]``, labels ``[M]``, per-step learning rates."""

    images: Tensor
    labels: Tensor
    lrs: Tensor
    outer_losses: list[float] = field(default_factory=list)


def _check_budget(fn: str, images_per_class: object, n_classes: int) -> int:
    if isinstance(images_per_class, bool) or not isinstance(images_per_class, int):
        raise TypeError(
            f"{fn}: images_per_class={images_per_class!r} must be an int >= 1 (synthetic images "
            f"per class)."
        )
    if images_per_class < 1:
        raise ValueError(
            f"{fn}: images_per_class={images_per_class} gives a distillation budget of "
            f"{images_per_class * n_classes} images: a model trained on no image learns "
            f"nothing. Use images_per_class >= 1 (e.g. 1 or 10)."
        )
    return images_per_class


def distill_problem(config: DistillConfig, fn: str = _FN) -> bilevel.Problem:
    """Inner: CE on the synthetic set (``h["images"]``); outer: CE on a real batch."""

    def synthetic_loss(w: Params, h: dict[str, Tensor], labels: Tensor) -> Tensor:
        return F.cross_entropy(forward(w, h["images"]), labels)

    def real_loss(w: Params, h: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(forward(w, x), y)

    def lr(h: dict[str, Tensor], step: int, name: str) -> Tensor:
        return torch.exp(h["log_lr"][step])

    return bilevel.Problem(
        synthetic_loss,
        real_loss,
        optim.SGD(lr=1.0),  # lr: replaced by the learned per-step rule
        config.inner_steps,
        lr=lr,
        name=fn,
        inner_name="synthetic-set loss",
        outer_name="real-batch loss",
    )


def _sizes(config: DistillConfig, d_in: int, n_classes: int) -> tuple[int, ...]:
    return (d_in, *config.hidden, n_classes)


def distill(train: Split, config: DistillConfig = DistillConfig(), *, seed: int = 0) -> Distilled:
    """Learn ``images_per_class`` synthetic images per class (and the inner learning rates).

    Args:
        train: real training images ``[N, D]`` and labels ``[N]`` (the outer objective's data).
        config: :class:`DistillConfig`.
        seed: synthetic-image initialization, outer batches and the inits drawn while learning.

    Returns:
        :class:`Distilled`.

    Raises:
        ValueError: a budget of zero images, an empty training set, no inner step.

    Example:
        >>> import torch
        >>> from metagrad.workloads import DistillConfig, Split, distill
        >>> x, y = torch.rand(30, 4), torch.arange(30) % 3
        >>> d = distill(Split(x, y), DistillConfig(hidden=(8,), inner_steps=2, iterations=3))
        >>> d.images.shape, d.labels.tolist()
        (torch.Size([3, 4]), [0, 1, 2])
    """
    n_classes = int(train.y.max()) + 1 if len(train.y) else 0
    ipc = _check_budget(_FN, config.images_per_class, n_classes)
    if len(train.y) == 0:
        raise ValueError(
            f"{_FN}: the training set is empty; the outer objective needs real images."
        )
    if config.inner_steps < 1:
        raise ValueError(
            f"{_FN}: inner_steps={config.inner_steps}: with no training step the synthetic "
            f"images cannot reach the real-batch loss. Use inner_steps >= 1 (e.g. 10)."
        )
    g = torch.Generator().manual_seed(seed)
    dtype = train.x.dtype
    labels = torch.arange(n_classes).repeat_interleave(ipc)
    # Near-uniform gray start: what the images become is then visible in the PNG grid.
    images = 0.5 + 0.05 * torch.randn(len(labels), train.x.shape[1], generator=g, dtype=dtype)
    h = {
        "images": images.requires_grad_(),
        "log_lr": torch.full(
            (config.inner_steps,), math.log(config.init_lr), dtype=dtype
        ).requires_grad_(),
    }
    opt = Stepper(optim.Adam(lr=config.outer_lr), h)
    pb = distill_problem(config)
    sizes = _sizes(config, train.x.shape[1], n_classes)
    out = Distilled(images, labels, h["log_lr"])
    for it in range(config.iterations):
        w0 = init_mlp(sizes, seed=seed * 1_000_003 + it, dtype=dtype)
        idx = torch.randint(len(train.y), (min(config.outer_batch, len(train.y)),), generator=g)
        res = bilevel.hypergrad(
            pb, w0, h, labels, (train.x[idx], train.y[idx]), strategy=config.strategy
        )
        opt.step(res.grads.h)
        out.outer_losses.append(float(res.value))
    out.images = h["images"].detach().clone()
    out.lrs = torch.exp(h["log_lr"].detach())
    return out


def train_on(
    images: Tensor,
    labels: Tensor,
    lrs: Tensor,
    config: DistillConfig,
    *,
    seed: int,
    n_classes: int | None = None,
) -> Params:
    """A fresh MLP (init ``seed``) after ``len(lrs)`` steps on ``(images, labels)`` only."""
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    _check_budget("metagrad.workloads.train_on", len(images) // max(n_classes, 1), n_classes)
    cfg = DistillConfig(hidden=config.hidden, inner_steps=len(lrs))
    w0 = init_mlp(_sizes(cfg, images.shape[1], n_classes), seed=seed, dtype=images.dtype)
    h = {"images": images.detach(), "log_lr": torch.log(lrs.detach())}
    pb = distill_problem(cfg, "metagrad.workloads.train_on")
    # The outer value is not needed; the synthetic set stands in for the outer batch.
    synthetic = (images.detach(), labels.detach())
    res = bilevel.hypergrad(pb, w0, h, labels.detach(), synthetic, need_grad=False)
    assert res.w is not None
    return res.w


def evaluate_distilled(
    images: Tensor,
    labels: Tensor,
    lrs: Tensor,
    config: DistillConfig,
    test: Split,
    *,
    seeds: range,
) -> list[float]:
    """Test accuracy of :func:`train_on` from each initialization in ``seeds``."""
    n_classes = int(test.y.max()) + 1
    return [
        accuracy(train_on(images, labels, lrs, config, seed=s, n_classes=n_classes), test.x, test.y)
        for s in seeds
    ]


def save_image_grid(
    images: Tensor,
    path: str | Path,
    *,
    n_classes: int,
    side: int = IMAGE_SIDE,
    scale: int = 8,
) -> Path:
    """Save ``images`` ``[n_classes * ipc, side * side]`` as a PNG: one column per class.

    Pixel values are mapped to gray levels by the min and max over all images (synthetic
    images leave [0, 1]); Pillow is a dependency of metagrad.
    """
    from PIL import Image

    ipc = len(images) // n_classes
    if ipc < 1 or len(images) != ipc * n_classes:
        raise ValueError(
            f"metagrad.workloads.save_image_grid: {len(images)} images do not fill "
            f"{n_classes} classes equally; pass images_per_class * n_classes of them."
        )
    x = images.detach().to(torch.float64).reshape(n_classes, ipc, side, side)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo if hi > lo else 1.0)
    pad = 1
    cell = side * scale + pad
    grid = torch.ones(ipc * cell + pad, n_classes * cell + pad, dtype=torch.float64)
    for c in range(n_classes):
        for i in range(ipc):
            tile = x[c, i].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            r0, c0 = pad + i * cell, pad + c * cell
            grid[r0 : r0 + side * scale, c0 : c0 + side * scale] = tile
    # Dark strokes on white, like the digits themselves (high value = ink).
    pixels = ((1.0 - grid) * 255).round().to(torch.uint8).numpy()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(out)
    return out
