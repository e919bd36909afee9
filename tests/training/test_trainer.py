"""The trainer: every algorithm runs, exact resume, evaluation, output-folder safety."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from metagrad.training import (
    ALGORITHMS,
    CheckpointError,
    ConfigError,
    EvalResult,
    TrainConfig,
    Trainer,
    mean_ci95,
)


def _params(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.learner.state_dict().items()}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_and_evaluates(algorithm: str, tiny_sinusoid: TrainConfig) -> None:
    cfg = tiny_sinusoid.replace(algorithm=algorithm, iterations=2, inner_steps=2)
    t = Trainer(cfg, progress=False)
    before = _params(t)
    assert t.train() == 2
    after = _params(t)
    assert any(not torch.equal(before[k], after[k]) for k in before if "module" in k)
    res = t.evaluate()
    assert [r.steps for r in res.rows] == [0, 1, 2]
    assert all(math.isfinite(r.loss) for r in res.rows)


@pytest.mark.parametrize(
    "change", [{}, {"lr_schedule": "cosine", "clip_grad": 0.5, "algorithm": "metasgd"}]
)
def test_exact_resume_is_bitwise(
    tmp_path: Path, tiny_sinusoid: TrainConfig, change: dict[str, object]
) -> None:
    cfg = tiny_sinusoid.replace(**change)
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.train()
    part = Trainer(cfg, tmp_path / "part", progress=False)
    assert part.train(until=3) == 3  # "interrupted" at iteration 3
    del part
    resumed = Trainer(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed.iteration == 3
    assert resumed.train() == 6
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log has each iteration once, in order, across the interruption
    with open(tmp_path / "part" / "metrics.csv") as f:
        its = [int(r["iteration"]) for r in csv.DictReader(f)]
    assert its == [2, 3, 4, 6]


def test_keyboard_interrupt_saves_a_checkpoint(
    tmp_path: Path, tiny_sinusoid: TrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = Trainer(tiny_sinusoid, tmp_path, progress=False)
    real_step = t.step

    def step() -> tuple[float, float]:
        if t.iteration == 4:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(t, "step", step)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert Trainer(tiny_sinusoid, tmp_path, resume=True, progress=False).iteration == 4


def test_output_folder_is_never_clobbered(tmp_path: Path, tiny_sinusoid: TrainConfig) -> None:
    Trainer(tiny_sinusoid.replace(iterations=1), tmp_path, progress=False).train()
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a training checkpoint"):
        Trainer(tiny_sinusoid, tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    with pytest.raises(CheckpointError, match="algorithm 'maml' but this run uses 'reptile'"):
        Trainer(tiny_sinusoid.replace(algorithm="reptile"), tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"another model/run.*seed"):
        Trainer(tiny_sinusoid.replace(seed=7), tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    with pytest.raises(CheckpointError, match=r"no checkpoint.pt"):
        Trainer(tiny_sinusoid, tmp_path / "new", resume=True, progress=False)


def test_unwritable_output(tmp_path: Path, tiny_sinusoid: TrainConfig) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        Trainer(tiny_sinusoid, blocker / "run", progress=False)


def test_from_checkpoint_restores_and_rejects_model_changes(
    tmp_path: Path, tiny_sinusoid: TrainConfig
) -> None:
    t = Trainer(tiny_sinusoid, tmp_path, progress=False)
    t.train()
    back = Trainer.from_checkpoint(tmp_path / "checkpoint.pt", overrides={"eval_tasks": 3})
    assert all(torch.equal(v, _params(t)[k]) for k, v in _params(back).items())
    assert back.evaluate().tasks == 3
    with pytest.raises(CheckpointError, match="fixed by the checkpoint"):
        Trainer.from_checkpoint(tmp_path, overrides={"algorithm": "reptile"})


def test_checkpoint_state_dict_mismatch_is_explained(
    tmp_path: Path, tiny_sinusoid: TrainConfig
) -> None:
    t = Trainer(tiny_sinusoid.replace(iterations=1), tmp_path, progress=False)
    t.train()
    other = Trainer(tiny_sinusoid.replace(algorithm="metasgd"), progress=False)
    from metagrad.training import load_checkpoint

    with pytest.raises(CheckpointError, match="does not fit this model/algorithm"):
        other._restore(load_checkpoint(tmp_path))


def test_omniglot_pipeline_on_fixture_zips(omniglot_zips: Path, tmp_path: Path) -> None:
    cfg = TrainConfig().replace(
        task="omniglot", data=str(omniglot_zips), n_way=3, shots=1, queries=1, eval_queries=2,
        hidden=4, image_size=16, rotations=[0, 90], split=[0.5, 0.25, 0.25], inner_lr=0.4,
        test_steps=[0, 1], meta_batch=2, iterations=2, val_every=1, val_tasks=2, eval_tasks=4,
        log_every=1,
    )  # fmt: skip
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.train()
    res = t.evaluate()
    assert res.metric == "accuracy" and res.shots == 1 and res.queries == 2
    assert all(r.accuracy is not None and 0 <= r.accuracy <= 1 for r in res.rows)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["val_accuracy"] != ""


def test_n_way_larger_than_split(omniglot_zips: Path) -> None:
    cfg = TrainConfig().replace(
        task="omniglot", data=str(omniglot_zips), n_way=9, shots=1, queries=1, image_size=16,
        rotations=[0], split=[0.5, 0.25, 0.25],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"train split.*n_way=9 but the data has only 8"):
        Trainer(cfg, progress=False)


def test_mean_ci95() -> None:
    m, ci = mean_ci95([1.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(1.96 * 1.0 / math.sqrt(2))
    r = EvalResult(600, 5, 100, "mse")
    with pytest.raises(KeyError):
        r.row(1)


def test_diverging_inner_loop_is_reported_not_fatal(tiny_sinusoid: TrainConfig) -> None:
    t = Trainer(
        tiny_sinusoid.replace(inner_lr=1e6, iterations=1, test_steps=[0, 3]), progress=False
    )
    res = t.evaluate()
    assert res.row(0).diverged == 0 and math.isfinite(res.row(0).loss)
    assert res.row(3).diverged == res.tasks and math.isnan(res.row(3).loss)
    from metagrad.training import format_table

    assert f"diverged in {res.tasks}/{res.tasks} tasks" in format_table(res)
