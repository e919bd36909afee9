"""MAML++ per-step running statistics (per_step_bn=True with bn="running")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metagrad as mg

D = torch.float64


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).to(D)


def _tasks(shift: float = 0.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(2, 8, 3, generator=g, dtype=D) * 2 + shift
    xq = torch.randn(2, 8, 3, generator=g, dtype=D) * 2 + shift
    return (
        xs,
        torch.randint(0, 2, (2, 8), generator=g),
        xq,
        torch.randint(0, 2, (2, 8), generator=g),
    )


def test_per_step_statistics_are_recorded_per_step_and_user_buffers_untouched() -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = mg.MAML(model, F.cross_entropy, 0.5, 2, per_step_bn=True, bn="running")
    names = sorted(n for n, _ in learner.named_buffers() if n.startswith("step_stats"))
    assert len(names) == 3 * 2  # steps 0..2, mean and var, one BatchNorm
    xs, ys, xq, yq = _tasks(shift=3.0)
    learner.meta_loss(xs, ys, xq, yq).backward()
    s0 = learner.step_stats_s0__1__mean
    s1 = learner.step_stats_s1__1__mean
    s2 = learner.step_stats_s2__1__mean
    # Step 0 sees the support batch under theta; expected running mean = 0.9*0 + 0.1*mean over tasks.
    h0 = torch.stack([(xs[i] @ model[0].weight.T + model[0].bias).mean(0) for i in range(2)]).mean(
        0
    )
    assert torch.allclose(s0, 0.1 * h0.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(s1, s0) and not torch.allclose(s2, s1)  # fast weights differ per step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_eval_mode_reads_the_statistics_of_each_step() -> None:
    model = _net()
    learner = mg.MAML(
        model, F.cross_entropy, 0.5, 1, per_step_bn=True, bn="running", strategy="loop"
    )
    xs, ys, xq, yq = _tasks(shift=1.0)
    for _ in range(3):
        learner.meta_loss(xs, ys, xq, yq)
    learner.eval()
    model.eval()
    with torch.no_grad():
        got = learner.meta_loss(xs, ys, xq, yq)

    # Independent evaluation: step k uses step-k stats and step-k norm weights.
    def fwd(p: dict[str, torch.Tensor], k: int, x: torch.Tensor) -> torch.Tensor:
        p = dict(p)
        p["1.weight"] = learner.step_norm[f"s{k}__1__weight"]
        p["1.bias"] = learner.step_norm[f"s{k}__1__bias"]
        bufs = {
            "1.running_mean": getattr(learner, f"step_stats_s{k}__1__mean"),
            "1.running_var": getattr(learner, f"step_stats_s{k}__1__var"),
            "1.num_batches_tracked": model[1].num_batches_tracked,
        }
        return functional_call(model, (p, bufs), (x,))

    total = torch.zeros((), dtype=D)
    for i in range(2):
        with torch.enable_grad():
            theta = {
                n: v.detach().requires_grad_()
                for n, v in model.named_parameters()
                if not n.startswith("1.")
            }
            loss = F.cross_entropy(fwd(theta, 0, xs[i]), ys[i])
            gs = torch.autograd.grad(loss, list(theta.values()))
        t1 = {n: v - 0.5 * g for (n, v), g in zip(theta.items(), gs)}
        total = total + F.cross_entropy(fwd(t1, 1, xq[i]), yq[i]) / 2
    assert torch.allclose(got, total.detach(), rtol=1e-12)
    # adapt/predict also use the last step's statistics.
    params = learner.adapt(xs[0], ys[0], steps=1)
    assert torch.equal(params["1.running_mean"], learner.step_stats_s1__1__mean)
    pred = learner.predict(params, xq[0])
    assert torch.allclose(
        pred, fwd({k: v for k, v in params.items() if "running" not in k}, 1, xq[0]), rtol=1e-12
    )


def test_training_gradient_unchanged_by_statistics() -> None:
    """In train mode norm layers use batch statistics: the meta-gradient equals transductive BN's."""
    xs, ys, xq, yq = _tasks()
    a = mg.MAML(_net(), F.cross_entropy, 0.5, 2, per_step_bn=True, bn="running").meta_grad(
        xs, ys, xq, yq
    )
    b = mg.MAML(_net(), F.cross_entropy, 0.5, 2, per_step_bn=True, bn="transductive").meta_grad(
        xs, ys, xq, yq
    )
    for k in b:
        assert (a[k] is None and b[k] is None) or torch.allclose(a[k], b[k], rtol=1e-12, atol=1e-15)  # type: ignore[arg-type]


def test_per_step_statistics_refuse_vmap() -> None:
    with pytest.raises(ValueError, match="per-step statistics"):
        mg.MAML(_net(), F.cross_entropy, per_step_bn=True, bn="running", strategy="vmap", order=1)
