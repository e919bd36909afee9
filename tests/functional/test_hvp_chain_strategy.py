"""strategy="hvp_chain": the backward HVP chain equals the create_graph loop to rounding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad.models import conv4

D = torch.float64


def _rel(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> float:
    assert a.keys() == b.keys()
    num = den = 0.0
    for k in b:
        if b[k] is None:
            assert a[k] is None, k
            continue
        num += float(((a[k] - b[k]) ** 2).sum())  # type: ignore[operator]
        den += float((b[k] ** 2).sum())  # type: ignore[operator]
    return (num / den) ** 0.5


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(1, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 1)
    ).to(D)


def _reg_tasks() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(3, 5, 1, generator=g, dtype=D) for _ in range(4))


MLP_CASES: dict[str, Callable[[nn.Module, str], mg.MAML]] = {
    "maml-o2": lambda m, s: mg.MAML(m, F.mse_loss, 0.1, 3, strategy=s),
    "maml-o1": lambda m, s: mg.MAML(m, F.mse_loss, 0.1, 3, order=1, strategy=s),
    "zero-steps": lambda m, s: mg.MAML(m, F.mse_loss, 0.1, 0, strategy=s),
    "metasgd": lambda m, s: mg.MetaSGD(m, F.mse_loss, 0.1, 2, strategy=s),
    "lslr+msl": lambda m, s: mg.MAML(
        m,
        F.mse_loss,
        0.1,
        3,
        learn_inner_lr="per_step",
        multi_step_loss=True,
        msl_anneal_steps=4,
        strategy=s,
    ),
    "anil": lambda m, s: mg.ANIL(m, F.mse_loss, head="4", inner_lr=0.1, inner_steps=2, strategy=s),
    "momentum": lambda m, s: mg.MAML(m, F.mse_loss, 0.1, 3, inner_optimizer="momentum", strategy=s),
    "adam": lambda m, s: mg.MAML(m, F.mse_loss, 0.01, 3, inner_optimizer="adam", strategy=s),
}


@pytest.mark.parametrize("strategy", ["hvp_chain", "checkpoint"])
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_hvp_chain_equals_create_graph_loop_mlp(case: str, strategy: str) -> None:
    model, tasks = _mlp(), _reg_tasks()
    ref = MLP_CASES[case](model, "loop").meta_grad(*tasks)
    got = MLP_CASES[case](model, strategy).meta_grad(*tasks)
    assert _rel(got, ref) <= 1e-10


@pytest.mark.parametrize("steps", [1, 2, 5, 7])
def test_checkpoint_segments_cover_every_step(steps: int) -> None:
    """Segment lengths ceil(sqrt(K)) that do and do not divide K, with the multi-step loss."""
    model, tasks = _mlp(), _reg_tasks()

    def make(s: str) -> mg.MAML:
        return mg.MAML(
            model, F.mse_loss, 0.05, steps, multi_step_loss=True, msl_anneal_steps=2, strategy=s
        )

    assert _rel(make("checkpoint").meta_grad(*tasks), make("loop").meta_grad(*tasks)) <= 1e-10


@pytest.mark.parametrize("per_step_bn", [False, True])
def test_hvp_chain_equals_create_graph_loop_conv_bn(per_step_bn: bool) -> None:
    torch.manual_seed(3)
    model = conv4(n_way=3, hidden=4, image_size=16).to(D)
    g = torch.Generator().manual_seed(4)
    xs, xq = (
        torch.randn(2, 3, 1, 16, 16, generator=g, dtype=D),
        torch.randn(2, 6, 1, 16, 16, generator=g, dtype=D),
    )
    ys, yq = torch.arange(3).repeat(2, 1), torch.arange(3).repeat_interleave(2).repeat(2, 1)

    def make(s: str) -> mg.MAML:
        return mg.MAML(
            model,
            F.cross_entropy,
            0.1,
            3,
            learn_inner_lr="per_step",
            per_step_bn=per_step_bn,
            strategy=s,
        )

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert (
        _rel(make("hvp_chain").meta_grad(xs, ys, xq, yq), make("loop").meta_grad(xs, ys, xq, yq))
        <= 1e-10
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hvp_chain_agrees_with_finite_differences() -> None:
    learner = mg.MAML(_mlp(), F.mse_loss, 0.1, 4, strategy="hvp_chain")
    report = mg.check_meta_gradient(learner, *_reg_tasks())
    assert report.passed, str(report)


def test_hvp_chain_backward_and_value_only() -> None:
    model, tasks = _mlp(), _reg_tasks()
    learner = mg.MAML(model, F.mse_loss, 0.1, 2, strategy="hvp_chain")
    loss = learner.meta_loss(*tasks)
    loss.backward()
    ref = mg.MAML(model, F.mse_loss, 0.1, 2, strategy="loop").meta_grad(*tasks)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[f"module.{name}"], rtol=1e-10, atol=1e-14)  # type: ignore[arg-type]
    with torch.no_grad():
        value = learner.meta_loss(*tasks)
    assert torch.allclose(value, loss.detach())


def test_hvp_chain_names_task_and_step_on_nan() -> None:
    xs, ys, xq, yq = _reg_tasks()
    xs = xs.clone()
    xs[1, 2, 0] = float("nan")
    learner = mg.MAML(_mlp(), F.mse_loss, 0.1, 2, strategy="hvp_chain")
    with pytest.raises(mg.NonFiniteError) as exc:
        learner.meta_loss(xs, ys, xq, yq)
    assert exc.value.task == 1 and exc.value.step == 0
