"""``metagrad.load``: the learner of a ``metagrad train`` run (or the policies of a
``metagrad train navigation`` run) back in one call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mg_image_fixtures import make_image_folder
from torch import nn

import metagrad
from metagrad.cli import main
from metagrad.rl import NavigationPolicy
from metagrad.rl._train import TEST_STREAM
from metagrad.tasks import SinusoidTasks, derive_seed
from metagrad.training import CheckpointError, Trainer, evaluate, load_checkpoint
from metagrad.training._checkpoint import save_checkpoint

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


NAV = ["--iterations", "2", "--pretrain-iterations", "1", "--meta-batch", "2", "--trajectories",
       "2", "--horizon", "4", "--hidden", "4", "--eval-tasks", "3", "--fisher-tasks", "1",
       "--no-progress", "--no-plots"]  # fmt: skip


@pytest.fixture(scope="module")
def navigation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "navigation"
    assert main(["train", "navigation", "--output", str(out), *NAV]) == 0
    return out


def test_load_a_navigation_run(navigation_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = metagrad.load(navigation_run)
    assert isinstance(policy, NavigationPolicy) and policy.iteration == 2
    assert "NavigationPolicy(maml-trpo, 2 meta-iterations" in repr(policy)
    ckpt = load_checkpoint(navigation_run)
    assert policy.pretrained is not None and set(policy.params) == set(ckpt["learner"])
    for k, v in ckpt["learner"].items():
        assert torch.equal(policy.params[k], v), k
        assert torch.equal(policy.pretrained[k], ckpt["pretrained"][k]), k
    assert set(policy.policies()) == {"maml", "pretrained", "random"}
    assert policy.config.horizon == 4 and policy.env.horizon == 4
    # the evaluation `metagrad train` wrote and `metagrad eval` prints
    res = json.loads((navigation_run / "results.json").read_text())
    assert json.loads(json.dumps(policy.evaluate()["rows"])) == res["policies"]
    capsys.readouterr()
    argv = ["eval", str(navigation_run), "--tasks", "2", "--test-steps", "0,1", "--seed", "7"]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mine = policy.evaluate(tasks=2, test_steps=[0, 1], seed=7)
    assert printed == json.loads(json.dumps(mine))
    assert policy.config.eval_tasks == 3  # evaluate's settings do not stick


def test_loaded_navigation_policy_adapts_like_the_evaluation(navigation_run: Path) -> None:
    policy = metagrad.load(navigation_run)
    assert isinstance(policy, NavigationPolicy)
    ref = policy.evaluate(tasks=2, test_steps=[0, 1], seed=7)["rows"]["maml"]

    # the held-out goals and random numbers of that evaluation (2 tasks: one chunk)
    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(7, TEST_STREAM))

    gen, n = generator(), policy.config.eval_trajectories
    goals = policy.env.sample_goals(2, gen)
    fast = policy.adapt(goals, 1, generator=gen)  # draws the "0 steps" trajectories, one step
    assert set(fast) == set(policy.params) and fast["log_std"].shape == (2, 2)
    after = policy.rollout(goals, n, params=fast, generator=gen)
    gen = generator()
    before = policy.rollout(policy.env.sample_goals(2, gen), n, generator=gen)
    for row, roll in zip(ref, (before, after)):
        assert row["return"] == pytest.approx(float(roll.returns().mean(1).double().mean()))
    same = policy.adapt(goals, 0)
    assert torch.equal(same["l0.weight"][1], policy.params["l0.weight"])
    obs = torch.zeros(2, 5, 2)
    assert policy.act(obs, params=fast).shape == (2, 5, 2)
    assert torch.equal(policy.act(obs[0], deterministic=True),
                       policy.act(obs[0], deterministic=True))  # fmt: skip
    with pytest.raises(ValueError, match="steps=-1 must be an int >= 0"):
        policy.adapt(goals, -1)


def test_navigation_errors(navigation_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="navigation run, which runs on the CPU only"):
        metagrad.load(navigation_run, device="cuda")
    save_checkpoint({"kind": "someone-else/1", "config": {}}, tmp_path)
    with pytest.raises(CheckpointError, match="kind 'someone-else/1', which this metagrad"):
        metagrad.load(tmp_path)
