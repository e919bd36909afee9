"""Reptile's tasks run in one ``vmap`` on vmap-safe models: the same direction as the loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad as mg

D = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )


def _tasks(T: int = 6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    amp = torch.rand(T, 1, 1, generator=g, dtype=D) * 4 + 0.5
    xs = torch.rand(T, 10, 1, generator=g, dtype=D) * 10 - 5
    xq = torch.rand(T, 7, 1, generator=g, dtype=D) * 10 - 5
    return xs, amp * torch.sin(xs), xq, amp * torch.sin(xq)


def _direction(learner: mg.Reptile, model: nn.Module, tasks: tuple[Tensor, ...]) -> Tensor:
    model.zero_grad(set_to_none=True)
    loss = learner.meta_loss(*tasks)
    loss.backward()
    return torch.cat([loss.reshape(1), *(p.grad.reshape(-1) for p in model.parameters())])


@pytest.mark.parametrize("inner_optimizer", ["sgd", "momentum", "adam"])
def test_vmapped_tasks_equal_the_loop(inner_optimizer: str) -> None:
    model = _model().to(D)
    tasks = _tasks()
    learner = mg.Reptile(model, F.mse_loss, inner_lr=0.02, inner_steps=4,
                         inner_optimizer=inner_optimizer)  # fmt: skip
    got = _direction(learner, model, tasks)
    assert learner._vmap_ok is True  # the tasks ran in one vmap
    learner._vmap_ok = False  # the per-task loop
    want = _direction(learner, model, tasks)
    err = float((got - want).norm() / want.norm())
    assert err < 1e-13, err
    # the hand-written Reptile direction: theta - mean(phi) after 4 SGD steps per task
    if inner_optimizer == "sgd":
        theta = [p.detach() for p in model.parameters()]
        total = [torch.zeros_like(p) for p in theta]
        for i in range(tasks[0].shape[0]):
            w = [p.clone().requires_grad_() for p in theta]
            for _ in range(4):
                out = torch.func.functional_call(model, dict(zip(
                    [n for n, _ in model.named_parameters()], w)), (tasks[0][i],))  # fmt: skip
                gs = torch.autograd.grad(F.mse_loss(out, tasks[1][i]), w)
                w = [(a - 0.02 * b).detach().requires_grad_() for a, b in zip(w, gs)]
            total = [t + (p - a.detach()) / tasks[0].shape[0] for t, p, a in zip(total, theta, w)]
        ref = torch.cat([t.reshape(-1) for t in total])
        assert float((got[1:] - ref).norm() / ref.norm()) < 1e-13


def test_batches_above_the_second_order_size_rule() -> None:
    """First-order Reptile keeps vmap where MAML's ``vmap_pays`` picks the loop (measured)."""
    from metagrad.algorithms._task import vmap_pays

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 320), nn.Tanh(), nn.Linear(320, 320), nn.Tanh(),
                          nn.Linear(320, 1)).to(D)  # fmt: skip
    tasks = _tasks(T=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert not vmap_pays(params, tasks[0], tasks[2])  # 103k parameters: MAML would loop
    learner = mg.Reptile(model, F.mse_loss, inner_lr=0.01, inner_steps=2)
    got = _direction(learner, model, tasks)
    assert learner._vmap_ok is True
    learner._vmap_ok = False
    want = _direction(learner, model, tasks)
    assert float((got - want).norm() / want.norm()) < 1e-12


def test_nan_falls_back_to_the_loop_that_names_task_and_step() -> None:
    model = _model().to(D)
    xs, ys, xq, yq = _tasks()
    ys = ys.clone()
    ys[3, 2] = float("nan")
    learner = mg.Reptile(model, F.mse_loss, inner_lr=0.02, inner_steps=3)
    with pytest.raises(mg.NonFiniteError, match="task 3"):
        learner.meta_loss(xs, ys, xq, yq)


def test_unused_parameter_is_refused_as_in_the_loop() -> None:
    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.unused = _model(), nn.Parameter(torch.zeros(3))

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    model = Extra().to(D)
    learner = mg.Reptile(model, F.mse_loss, inner_lr=0.02, inner_steps=2)
    with pytest.raises(ValueError, match="do not reach"):
        learner.meta_loss(*_tasks())
