"""``metagrad.load``: the learner of a ``metagrad train`` run back in one call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mg_image_fixtures import make_image_folder
from torch import nn

import metagrad
from metagrad.cli import main
from metagrad.tasks import SinusoidTasks
from metagrad.training import CheckpointError, Trainer, evaluate, load_checkpoint

TINY = ["--iterations", "3", "--meta-batch", "2", "--eval-tasks", "2", "--val-every", "2",
        "--val-tasks", "2", "--test-steps", "0,1", "--no-progress", "--no-plots"]  # fmt: skip


def train(out: Path, *extra: str) -> Path:
    assert main(["train", *extra, "--output", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("runs") / "maml", "sinusoid")


def test_load_returns_the_trained_learner(
    sinusoid_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    learner = metagrad.load(sinusoid_run)
    assert isinstance(learner, metagrad.MAML) and not learner.training
    assert isinstance(learner.module, nn.Sequential)
    stored = load_checkpoint(sinusoid_run)["learner"]
    for name, value in learner.module.state_dict().items():  # plain names, no "module." prefix
        assert torch.equal(value, stored[f"module.{name}"])
    file_learner = metagrad.load(sinusoid_run / "checkpoint.pt")
    assert torch.equal(file_learner.module[0].weight, learner.module[0].weight)


def test_loaded_learner_evaluates_on_my_own_sampler(sinusoid_run: Path) -> None:
    learner = metagrad.load(sinusoid_run)
    mine = evaluate(learner, SinusoidTasks(5, 20, seed=123), tasks=4, steps=[0, 1], batch=4)
    same = Trainer.from_checkpoint(sinusoid_run).learner
    ref = evaluate(same, SinusoidTasks(5, 20, seed=123), tasks=4, steps=[0, 1], batch=4)
    assert [r.loss for r in mine.rows] == [r.loss for r in ref.rows]
    xs, ys, xq, _ = SinusoidTasks(10, seed=1).sample(1)
    fast = learner.adapt(xs[0], ys[0], steps=2)
    assert learner.predict(fast, xq[0]).shape == (10, 1)
    assert learner.module(xq[0]).shape == (10, 1)


def test_learned_rates_come_back(tmp_path: Path) -> None:
    run = train(tmp_path / "metasgd", "sinusoid", "--algorithm", "metasgd")
    learner = metagrad.load(run)
    assert isinstance(learner, metagrad.MetaSGD)
    stored = load_checkpoint(run)["learner"]
    extra = {k: v for k, v in learner.state_dict().items() if not k.startswith("module.")}
    assert extra and all(torch.equal(v, stored[k]) for k, v in extra.items())


def test_image_run_without_reading_the_data(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "images", classes=6, per_class=3, size=36)
    run = train(
        tmp_path / "folder", "folder", "--data", str(data), "--n-way", "2", "--k-shot", "1",
        "--queries", "1", "--eval-queries", "1", "--hidden", "4", "--split", "0.34,0.33,0.33",
    )  # fmt: skip
    for p in data.rglob("*.png"):
        p.unlink()  # load never touches the data
    learner = metagrad.load(run)
    conv = learner.module[0]
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 3 and conv.out_channels == 4
    assert learner.module(torch.rand(5, 3, 36, 36)).shape == (5, 2)  # files kept their size


def test_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        metagrad.load(tmp_path)
    bad = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not a metagrad training checkpoint"):
        metagrad.load(bad)
