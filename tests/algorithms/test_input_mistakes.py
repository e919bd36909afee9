"""Common input mistakes give a clear error before (or instead of) a wrong loss or a raw one.

From the reliability pass (issue 24): shape mistakes that broadcast silently, a single task read
as many, all labels ignored, PyTorch's raw messages for data/model mismatches, data-dependent
code under the auto-chosen vmap, T = 0, and an inner rate given as a tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad as mg

T, K = 2, 4


def _x(d: int = 3) -> Tensor:
    return torch.randn(T, K, d)


def _mse_learner(model: nn.Module | None = None, **kw: object) -> mg.MAML:
    return mg.MAML(model or nn.Linear(3, 1), F.mse_loss, 0.1, 1, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["auto", "loop", "hvp_chain"])
def test_target_that_broadcasts_into_a_k_by_k_loss_is_refused(strategy: str) -> None:
    learner = _mse_learner(strategy=strategy)
    x = _x()
    with pytest.raises(
        ValueError, match=r"output has per-task shape \(4, 1\) but the targets \(4,\)"
    ):
        learner.meta_loss(x, torch.randn(T, K), x, torch.randn(T, K))


def test_a_single_task_without_its_task_dimension_is_refused() -> None:
    learner = _mse_learner()
    with pytest.raises(ValueError, match=r"xs has shape \(4, 3\).*xs\.unsqueeze\(0\)"):
        learner.meta_loss(
            torch.randn(K, 3), torch.randn(K, 1), torch.randn(K, 3), torch.randn(K, 1)
        )


def test_all_labels_ignored_is_refused_naming_the_task() -> None:
    learner = mg.MAML(nn.Linear(3, 4), F.cross_entropy, 0.1, 1)
    ys = torch.randint(0, 4, (T, K))
    ys[1] = -100
    with pytest.raises(ValueError, match=r"every label of ys is -100 .* task\(s\) \[1\]"):
        learner.meta_loss(_x(), ys, _x(), torch.randint(0, 4, (T, K)))


def test_zero_tasks_is_named() -> None:
    with pytest.raises(ValueError, match="the meta-batch has 0 tasks"):
        _mse_learner().meta_loss(*(torch.randn(0, K, 3), torch.randn(0, K, 1)) * 2)


def test_check_meta_gradient_refuses_a_zero_step() -> None:
    learner = _mse_learner()
    x, y = _x(), torch.randn(T, K, 1)
    with pytest.raises(ValueError, match=r"step=0 must be a finite number > 0"):
        mg.check_meta_gradient(learner, x, y, x, y, step=0)


def test_raw_pytorch_errors_become_explanations() -> None:
    x, y = _x(), torch.randn(T, K, 1)
    with pytest.raises(ValueError, match=r"per-example input shape \(3,\).*first layer"):
        _mse_learner(nn.Linear(5, 1)).meta_loss(x, y, x, y)
    labels = torch.randint(0, 4, (T, K)).float()
    with pytest.raises(TypeError, match=r"integer class labels.*ys\.long\(\)"):
        mg.MAML(nn.Linear(3, 4), F.cross_entropy, 0.1, 1).meta_loss(x, labels, x, labels)
    xi = torch.randint(0, 3, (T, K, 3))
    with pytest.raises(TypeError, match=r"dtype torch\.int64.*xs\.float\(\)"):
        _mse_learner().meta_loss(xi, y, xi, y)

    class ToNumpy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            return torch.as_tensor(self.lin(x).numpy())

    with pytest.raises(RuntimeError, match="converts a tensor to numpy"):
        _mse_learner(ToNumpy()).meta_loss(x, y, x, y)


def test_label_out_of_range_vs_a_bug_in_the_users_model() -> None:
    x = _x()
    learner = mg.MAML(nn.Linear(3, 4), F.cross_entropy, 0.1, 1)
    bad = torch.randint(0, 7, (T, K))
    bad[0, 0] = 6
    with pytest.raises(ValueError, match=r"labels range over \[\d, 6\] but the model outputs 4"):
        learner.meta_loss(x, bad, x, bad)

    class Buggy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x)[:, [0, 1, 9]]  # the user's own indexing bug

    good = torch.randint(0, 2, (T, K))
    with pytest.raises(IndexError, match="index 9 is out of bounds"):
        mg.MAML(Buggy(), F.cross_entropy, 0.1, 1).meta_loss(x, good, x, good)


def test_data_dependent_code_under_auto_falls_back_to_the_loop() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.lin(x)
            return y if y.sum().item() > -1e9 else -y  # .item(): vmap cannot

    torch.manual_seed(0)
    model = Branchy()
    x, y = _x(), torch.randn(T, K, 1)
    got = _mse_learner(model).meta_grad(x, y, x, y)
    want = _mse_learner(model, strategy="loop").meta_grad(x, y, x, y)
    assert all(torch.allclose(got[k], want[k]) for k in want)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"\.item\(\)"):
        _mse_learner(model, strategy="vmap").meta_grad(x, y, x, y)


def test_inner_lr_as_a_tensor() -> None:
    x, y = _x(), torch.randn(T, K, 1)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    a = _mse_learner(model).meta_grad(x, y, x, y)
    b = mg.MAML(model, F.mse_loss, torch.tensor(0.1), 1).meta_grad(x, y, x, y)  # type: ignore[arg-type]
    assert all(torch.equal(a[k], b[k]) for k in a)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"learn_inner_lr='per_param'.*inner_lr=0\.1"):
        mg.MAML(model, F.mse_loss, torch.tensor(0.1, requires_grad=True), 1)  # type: ignore[arg-type]


def test_in_place_op_is_explained_under_the_default_strategy() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = torch.sigmoid(self.a(x))
            y.mul_(2)  # sigmoid's backward needs its output: breaks (double) backward
            return self.b(y)

    x, y = _x(), torch.randn(T, K, 1)
    for strategy in ("auto", "loop", "hvp_chain"):
        with pytest.raises(RuntimeError, match="modifies a tensor in place"):
            _mse_learner(InPlace(), strategy=strategy).meta_loss(x, y, x, y)


def test_label_check_works_for_batchnorm1d_models() -> None:
    """The label probe runs the whole support set: one example would break BatchNorm1d."""
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    learner = mg.MAML(model, F.cross_entropy, 0.1, 1)
    bad = torch.randint(0, 4, (T, K))
    bad[0, 0] = 6
    with pytest.raises(ValueError, match=r"labels range over \[\d, 6\] but the model outputs 4"):
        learner.meta_loss(_x(), bad, _x(), bad)
