"""Splits, label noise and the digits loader (its scikit-learn hint)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from metagrad.workloads import load_digits, stratified_split, symmetric_noise


def test_stratified_split_is_disjoint_and_balanced() -> None:
    y = torch.arange(100) % 4
    a, b, rest = stratified_split(y, (20, 40), seed=0)
    assert (len(a), len(b), len(rest)) == (20, 40, 40)
    assert len(set(torch.cat([a, b, rest]).tolist())) == 100
    assert torch.bincount(y[a], minlength=4).tolist() == [5, 5, 5, 5]
    assert torch.equal(stratified_split(y, (20, 40), seed=0)[0], a)  # reproducible


def test_symmetric_noise_changes_exactly_the_rate_to_other_classes() -> None:
    y = torch.arange(200) % 10
    noisy = symmetric_noise(y, 0.4, n_classes=10, seed=3)
    wrong = noisy != y
    assert int(wrong.sum()) == 80
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    with pytest.raises(ValueError, match=r"symmetric_noise: rate=1\.5"):
        symmetric_noise(y, 1.5, n_classes=10, seed=0)


def test_load_digits_without_sklearn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"metagrad\[workloads\]"):
        load_digits(100, 50)


def test_load_digits_splits() -> None:
    if importlib.util.find_spec("sklearn") is None:  # not imported: that takes seconds
        pytest.skip("scikit-learn is not installed (pip install metagrad[workloads])")
    d = load_digits(500, 300, seed=1)
    assert d.train.x.shape == (500, 64) and d.val.x.shape == (300, 64)
    assert len(d.test.y) == 1797 - 800
    assert float(d.train.x.max()) <= 1.0 and float(d.train.x.min()) >= 0.0
    with pytest.raises(ValueError, match=r"load_digits: n_train=1000, n_val=900"):
        load_digits(1000, 900)
    # the same arrays as scikit-learn's own loader (the fast path reads its CSV)
    from metagrad.workloads._data import _sklearn_digits

    x, y = _sklearn_digits()
    assert x.shape == (1797, 64) and torch.bincount(y).tolist()[:2] == [178, 182]
