"""``EvalRow.diverged``: tasks whose inner loop raised its own (support) loss, finite or not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metagrad.training import evaluate, format_table
from metagrad.training._report import write_task_losses


class _ConstantFit:
    """A learner predicting one constant per task, fitted by gradient descent on the MSE.

    Each step multiplies the residual by ``1 - 2 * lr``: ``lr < 1`` shrinks the support loss,
    ``lr > 1`` makes every step overshoot (the loss grows, finite, by ``(2 lr - 1)^2``).
    """

    training = False

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.loss_fn = F.mse_loss

    def eval(self) -> None:
        pass

    def train(self, mode: bool = True) -> None:
        pass

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int) -> torch.Tensor:
        p = torch.zeros(())
        for _ in range(steps):
            p = p - self.lr * 2 * (p - ys.mean())
        return p

    def predict(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.expand(x.shape)


class _Tasks:
    def sample(self, n: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(n)
        ys = 1 + torch.rand(n, 5, 1, generator=g)
        return torch.zeros(n, 5, 1), ys, torch.zeros(n, 7, 1), ys[:, :1].expand(n, 7, 1)


@pytest.mark.parametrize(("lr", "expect"), [(0.25, 0), (1.5, 10)])
def test_finite_blow_up_counts_as_diverged(lr: float, expect: int) -> None:
    res = evaluate(_ConstantFit(lr), _Tasks(), tasks=10, steps=[0, 1, 3], batch=4)  # type: ignore[arg-type]
    assert res.row(0).diverged == 0
    assert res.row(1).diverged == res.row(3).diverged == expect
    assert all(math.isfinite(r.loss) for r in res.rows)  # finite, yet diverged
    assert [len(v) for v in res.task_losses.values()] == [10, 10, 10]
    assert res.row(3).loss == pytest.approx(sum(res.task_losses[3]) / 10)
    table = format_table(res)
    assert ("(10/10 tasks diverged)" in table) == bool(expect)
    assert "+-" in table.splitlines()[-1]  # the mean and its CI stay printed
    assert "task_losses" not in res.to_dict()


def test_task_losses_csv(tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = evaluate(_ConstantFit(0.25), _Tasks(), tasks=3, steps=[0, 2])  # type: ignore[arg-type]
    path = write_task_losses(tmp_path / "test_losses.csv", res)
    lines = path.read_text().splitlines()
    assert lines[0] == "task,loss_0,loss_2" and len(lines) == 4
    assert float(lines[2].split(",")[2]) == res.task_losses[2][1]
