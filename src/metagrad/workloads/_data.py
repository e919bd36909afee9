"""Data of the bilevel workloads: scikit-learn's 8x8 digits, split, and label noise.

``load_digits`` ships with scikit-learn (1,797 images of 10 classes, no download), an optional
dependency: ``pip install metagrad[workloads]``. Every function here takes a seed and returns
plain tensors, so the workloads also run on any other ``(x, y)`` data.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

N_CLASSES = 10
IMAGE_SIDE = 8


class Split(NamedTuple):
    """One split: inputs ``x`` ``[N, 64]`` (pixels in [0, 1]) and labels ``y`` ``[N]``."""

    x: Tensor
    y: Tensor


class Digits(NamedTuple):
    """Disjoint train / validation / test splits, stratified by class."""

    train: Split
    val: Split
    test: Split


def _sklearn_digits() -> tuple[Tensor, Tensor]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError(
            "metagrad.workloads.load_digits needs scikit-learn (its 8x8 digits ship with it, no "
            "download): pip install metagrad[workloads] (or pip install scikit-learn)."
        )
    # The CSV that sklearn.datasets.load_digits reads: importing scikit-learn itself (scipy,
    # joblib...) takes seconds, reading its 1,797 rows does not.
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        data, target = table[:, :-1], table[:, -1]
    else:  # another layout: ask scikit-learn
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        data, target = bunch.data, bunch.target
    x = torch.as_tensor(data, dtype=torch.float64) / 16.0
    y = torch.as_tensor(target).to(torch.long)
    return x, y


def load_digits(
    n_train: int, n_val: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Digits:
    """scikit-learn's digits in three stratified splits; the test split is everything left.

    Args:
        n_train: training examples (about ``n_train / 10`` per class).
        n_val: validation examples.
        seed: the permutation within each class.
        dtype: floating dtype of the inputs.

    Returns:
        :class:`Digits` with ``x`` of shape ``[N, 64]`` in [0, 1].

    Raises:
        ImportError: scikit-learn is missing (names the extra to install).
        ValueError: the requested splits leave no test examples.
    """
    x, y = _sklearn_digits()
    if n_train < N_CLASSES or n_val < 0 or n_train + n_val >= len(y):
        raise ValueError(
            f"metagrad.workloads.load_digits: n_train={n_train}, n_val={n_val} must satisfy "
            f"n_train >= {N_CLASSES}, n_val >= 0 and n_train + n_val < {len(y)} (the test split "
            f"is the rest); use smaller splits."
        )
    train, val, test = stratified_split(y, (n_train, n_val), seed=seed)
    x = x.to(dtype)
    return Digits(Split(x[train], y[train]), Split(x[val], y[val]), Split(x[test], y[test]))


def stratified_split(y: Tensor, sizes: tuple[int, ...], *, seed: int) -> list[Tensor]:
    """Index sets of the given sizes (and one more with the rest), classes interleaved.

    Each class is shuffled and the examples are dealt class by class in turn, so every split
    holds every class in (nearly) its overall proportion.
    """
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
    per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class]
    # Deal: rank of each example within its class, ties broken by class; sort by that rank.
    order = torch.cat(per_class)
    rank = torch.cat([torch.arange(len(p), dtype=torch.float64) / len(p) for p in per_class])
    dealt = order[torch.argsort(rank, stable=True)]
    out, start = [], 0
    for n in sizes:
        idx = dealt[start : start + n]
        out.append(idx[torch.randperm(len(idx), generator=g)])
        start += n
    out.append(dealt[start:])
    return out


def symmetric_noise(y: Tensor, rate: float, *, n_classes: int, seed: int) -> Tensor:
    """Labels where a fraction ``rate`` (exactly ``round(rate * N)``) is changed to another class.

    Symmetric noise as in Ren et al. (2018): a corrupted label is drawn uniformly from the
    *other* classes, so the fraction of wrong labels is ``rate``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(
            f"metagrad.workloads.symmetric_noise: rate={rate!r} must be in [0, 1) (the fraction "
            f"of labels to corrupt), e.g. 0.4."
        )
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    flip = torch.randperm(n, generator=g)[: round(rate * n)]
    shift = torch.randint(1, n_classes, (len(flip),), generator=g)
    noisy = y.clone()
    noisy[flip] = (y[flip] + shift) % n_classes
    return noisy
