"""metagrad check: it passes on correct meta-gradients and FAILS on wrong ones."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import metagrad.check._check as check_mod
from metagrad.algorithms import MAML, MetaSGD, Reptile
from metagrad.check import check_meta_gradient
from metagrad.cli import main
from metagrad.models import sinusoid_mlp


def _tasks(T: int = 3, K: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(T, 2 * K, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = torch.sin(x) * (1 + torch.arange(T, dtype=torch.float64).view(T, 1, 1))
    return x[:, :K], y[:, :K], x[:, K:], y[:, K:]


@pytest.mark.parametrize("order", [1, 2])
def test_check_passes_on_engine(order: int) -> None:
    learner = MAML(
        sinusoid_mlp(hidden=8).double(), F.mse_loss, inner_lr=0.05, inner_steps=2, order=order
    )
    report = check_meta_gradient(learner, *_tasks())
    assert report.passed, str(report)
    assert report.fd_rel_error < 1e-6
    assert report.reference_rel_error is not None and report.reference_rel_error < 1e-10
    assert 0 < report.first_order_rel_distance < 1
    assert report.order == order


def test_check_does_not_touch_learner() -> None:
    model = sinusoid_mlp(hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = MetaSGD(model, F.mse_loss, inner_lr=0.05, inner_steps=1)
    check_meta_gradient(learner, *[t.float() for t in _tasks()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in learner.parameters())
    assert next(model.parameters()).dtype == torch.float32


def test_check_fails_on_a_wrong_meta_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1% error in the meta-gradient must fail both the FD and the reference comparisons."""
    real = check_mod.meta_gradient

    def wrong(*args, **kwargs):  # type: ignore[no-untyped-def]
        res = real(*args, **kwargs)
        res.grads = {k: None if g is None else g * 1.01 for k, g in res.grads.items()}
        return res

    monkeypatch.setattr(check_mod, "meta_gradient", wrong)
    learner = MAML(sinusoid_mlp(hidden=8).double(), F.mse_loss, inner_lr=0.05, inner_steps=1)
    report = check_meta_gradient(learner, *_tasks())
    assert not report.passed
    assert report.fd_rel_error > 1e-3
    assert report.reference_rel_error is not None and report.reference_rel_error > 1e-3


def test_check_rejects_reptile() -> None:
    learner = Reptile(sinusoid_mlp(hidden=8), F.mse_loss)
    with pytest.raises(TypeError, match=r"check_meta_gradient.*Reptile"):
        check_meta_gradient(learner, *_tasks())


def test_cli_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--algorithm", "metasgd", "--inner-steps", "2", "--tasks", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["passed"] is True
    assert out["algorithm"] == "MetaSGD" and out["num_meta_params"] == 2 * 1761


def test_cli_check_conv4_text(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "check",
            "--model",
            "conv4",
            "--hidden",
            "4",
            "--tasks",
            "2",
            "--shots",
            "1",
            "--queries",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "strategy=loop" in out and "verdict: PASS" in out


def test_cli_check_custom_factory(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "check",
            "--model",
            "metagrad.models:sinusoid_mlp",
            "--input-shape",
            "1",
            "--algorithm",
            "anil",
        ]
    )
    assert code == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--model", "nonsense"], "package.module:function"),
        (["check", "--model", "no_such_module_xyz:f"], "cannot import"),
        (["check", "--model", "metagrad.models:nothing", "--input-shape", "1"], "no callable"),
        (["check", "--model", "metagrad.models:sinusoid_mlp"], "--input-shape is required"),
        (["check", "--input-shape", "1,x"], "positive integers"),
    ],
)
def test_cli_check_bad_input(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
