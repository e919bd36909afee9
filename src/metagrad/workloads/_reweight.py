r"""Learning to reweight examples (Ren et al. 2018) against label noise.

At every training step the mini-batch's per-example weights come from a one-step lookahead:
perturb the batch loss by weights :math:`\epsilon` (zero), take one SGD step, and measure the loss
on a small clean set; the hypergradient

.. math::
    u_i = -\frac{\partial}{\partial \epsilon_i}
      \mathrm{CE}_{clean}\Bigl(w - \alpha \nabla_w \sum_j \epsilon_j \ell_j(w)\Bigr)\Big|_{\epsilon=0}
      = \alpha\, \nabla_w \mathrm{CE}_{clean}(w) \cdot \nabla_w \ell_i(w)

(computed by :func:`metagrad.bilevel.hypergrad`, one inner step) is clipped at zero and
normalized, :math:`\tilde u = \max(u, 0) / \sum_j \max(u_j, 0)`, and the real step minimizes
:math:`\sum_i \tilde u_i \ell_i(w)`. Examples whose gradient disagrees with the clean set's get
weight zero.

References:
    Ren, Zeng, Yang, Urtasun. Learning to Reweight Examples for Robust Deep Learning. ICML 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import bilevel, optim
from metagrad._typing import Params
from metagrad.workloads._data import Split
from metagrad.workloads._model import forward, init_mlp
from metagrad.workloads._stepper import Stepper

_FN = "metagrad.workloads.train_reweighted"


@dataclass(frozen=True)
class ReweightConfig:
    """Training settings shared by the reweighted and the plain runs.

    Args:
        hidden: hidden layer widths of the MLP.
        epochs: passes over the (noisy) training set.
        batch_size: mini-batch size.
        lr, momentum: SGD of the real training steps; ``lr`` is also the lookahead step.
        strategy: the :func:`metagrad.bilevel.hypergrad` strategy of the lookahead.
    """

    hidden: tuple[int, ...] = (128, 128)
    epochs: int = 60
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    strategy: str = "auto"


def lookahead_problem(lr: float, fn: str = _FN) -> bilevel.Problem:
    """One SGD step on the ``eps``-weighted batch loss, then the mean clean-set loss."""

    def weighted(w: Params, h: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return (h["eps"] * F.cross_entropy(forward(w, x), y, reduction="none")).sum()

    def clean(w: Params, h: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(forward(w, x), y)

    return bilevel.Problem(
        weighted,
        clean,
        optim.SGD(lr=lr),
        steps=1,
        name=fn,
        inner_name="weighted batch loss",
        outer_name="clean-set loss",
    )


def example_weights(
    pb: bilevel.Problem,
    w: Params,
    batch: tuple[Tensor, Tensor],
    clean: tuple[Tensor, Tensor],
    strategy: str = "auto",
) -> Tensor:
    r"""The normalized non-negative weights :math:`\tilde u` of one mini-batch."""
    eps = torch.zeros(len(batch[1]), dtype=batch[0].dtype, requires_grad=True)
    w0 = {k: v.detach() for k, v in w.items()}
    res = bilevel.hypergrad(pb, w0, {"eps": eps}, batch, clean, strategy=strategy)
    u = torch.clamp(-res.grads.h["eps"], min=0.0)
    total = u.sum()
    return u / total if bool(total > 0) else u


def _check(fn: str, name: str, split: Split) -> None:
    if len(split.y) == 0 or split.x.shape[0] != len(split.y):
        raise ValueError(
            f"{fn}: the {name} set has {split.x.shape[0]} inputs and {len(split.y)} labels; "
            f"it needs at least one example with one label each"
            + (
                " (learning to reweight scores every training example against this trusted "
                "set: give it a few clean examples per class, e.g. 5)."
                if name == "clean"
                else "."
            )
        )


def _train(
    fn: str,
    train: Split,
    config: ReweightConfig,
    seed: int,
    clean: Split | None,
    on_epoch: Callable[[int, Params], None] | None,
) -> tuple[Params, list[float]]:
    """SGD over ``train``; with ``clean`` every batch is reweighted by the lookahead."""
    n_out = (
        int(train.y.max()) + 1 if clean is None else int(torch.cat([train.y, clean.y]).max()) + 1
    )
    w = init_mlp((train.x.shape[1], *config.hidden, n_out), seed=seed, dtype=train.x.dtype)
    w = {k: v.detach().requires_grad_() for k, v in w.items()}
    opt = Stepper(optim.SGD(lr=config.lr, momentum=config.momentum), w)
    pb = lookahead_problem(config.lr, fn)
    g = torch.Generator().manual_seed(seed + 1)
    n = len(train.y)
    mean_weight_of: list[float] = []
    for epoch in range(config.epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, config.batch_size):
            idx = perm[start : start + config.batch_size]
            x, y = train.x[idx], train.y[idx]
            losses = F.cross_entropy(forward(w, x), y, reduction="none")
            if clean is None:
                loss = losses.mean()
            else:
                u = example_weights(pb, w, (x, y), (clean.x, clean.y), config.strategy)
                loss = (u * losses).sum()
                mean_weight_of.append(float(u.sum()))
            names = list(w)
            grads = torch.autograd.grad(loss, [w[k] for k in names])
            opt.step(dict(zip(names, grads)))
        if on_epoch is not None:
            on_epoch(epoch, {k: v.detach() for k, v in w.items()})
    return {k: v.detach() for k, v in w.items()}, mean_weight_of


def train_reweighted(
    train: Split,
    clean: Split,
    config: ReweightConfig = ReweightConfig(),
    *,
    seed: int = 0,
    on_epoch: Callable[[int, Params], None] | None = None,
) -> Params:
    """Train on (noisy) ``train`` with per-example weights from the lookahead on ``clean``.

    Args:
        train: the training set (labels may be wrong).
        clean: a small trusted set; only its loss is used, never a step on it.
        config: :class:`ReweightConfig`.
        seed: initialization and batch order.
        on_epoch: called as ``on_epoch(epoch, w)`` after every epoch (learning curves).

    Returns:
        The trained MLP parameters.

    Raises:
        ValueError: an empty clean (or training) set.

    Example:
        >>> import torch
        >>> from metagrad.workloads import ReweightConfig, Split, train_reweighted
        >>> x, y = torch.randn(40, 4), torch.arange(40) % 2
        >>> w = train_reweighted(Split(x, y), Split(x[:6], y[:6]), ReweightConfig(hidden=(8,), epochs=1))
        >>> sorted(w)
        ['l0.bias', 'l0.weight', 'l1.bias', 'l1.weight']
    """
    _check(_FN, "training", train)
    _check(_FN, "clean", clean)
    return _train(_FN, train, config, seed, clean, on_epoch)[0]


def train_plain(
    train: Split,
    config: ReweightConfig = ReweightConfig(),
    *,
    seed: int = 0,
    on_epoch: Callable[[int, Params], None] | None = None,
) -> Params:
    """The baseline: the same SGD on ``train``, every example weighted equally."""
    _check("metagrad.workloads.train_plain", "training", train)
    return _train("metagrad.workloads.train_plain", train, config, seed, None, on_epoch)[0]
