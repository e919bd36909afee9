"""--resume under changed settings: refused with the full list, or (--allow-config-change)
applied for real and recorded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mg_cli import run_cli

from metagrad.training import CheckpointError, TrainConfig, Trainer, load_checkpoint

TINY = ["--iterations", "4", "--meta-batch", "2", "--eval-tasks", "3", "--val-every", "2",
        "--log-every", "1", "--test-steps", "0,1", "--no-progress", "--no-plots"]  # fmt: skip


def run(argv: list[str]) -> int:
    return run_cli(argv)


@pytest.fixture
def run_dir(tmp_path: Path, tiny_sinusoid: TrainConfig) -> Path:
    Trainer(tiny_sinusoid, tmp_path, progress=False).train(until=3)
    return tmp_path


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"inner_lr": 0.02}, "inner_lr: checkpoint 0.01, now 0.02"),
        ({"meta_batch": 5}, "meta_batch: checkpoint 3, now 5"),
        ({"shots": 5}, "shots (--k-shot): checkpoint 10, now 5"),
        ({"lr_schedule": "cosine"}, "lr_schedule: checkpoint 'constant', now 'cosine'"),
        ({"meta_lr": 0.1}, "meta_lr: checkpoint 0.001, now 0.1"),
        ({"strategy": "loop"}, "strategy: checkpoint 'auto', now 'loop'"),
        ({"nan_policy": "skip"}, "nan_policy: checkpoint 'raise', now 'skip'"),
        ({"clip_grad": 1.0}, "clip_grad: checkpoint None, now 1.0"),
    ],
)
def test_changed_setting_is_refused_and_named(
    run_dir: Path, tiny_sinusoid: TrainConfig, change: dict[str, object], shown: str
) -> None:
    before = (run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError) as exc:
        Trainer(tiny_sinusoid.replace(**change), run_dir, resume=True, progress=False)
    assert shown in str(exc.value) and "--allow-config-change" in str(exc.value)
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_every_difference_is_listed_and_bookkeeping_is_free(
    run_dir: Path, tiny_sinusoid: TrainConfig
) -> None:
    cfg = tiny_sinusoid.replace(inner_lr=0.03, meta_batch=4, shots=7, lr_schedule="cosine")
    with pytest.raises(CheckpointError) as exc:
        Trainer(cfg, run_dir, resume=True, progress=False)
    msg = str(exc.value)
    for k in ("inner_lr", "meta_batch", "shots", "lr_schedule"):
        assert f"{k}" in msg
    assert msg.count("checkpoint ") == 4 + 1  # four differences (+ "checkpoint is from...")
    free = tiny_sinusoid.replace(iterations=9, val_every=4, log_every=3, checkpoint_every=5,
                                 val_tasks=2, eval_tasks=2)  # fmt: skip
    assert Trainer(free, run_dir, resume=True, progress=False).train() == 9


def test_allow_config_change_applies_meta_lr_for_real(
    run_dir: Path, tiny_sinusoid: TrainConfig
) -> None:
    cfg = tiny_sinusoid.replace(meta_lr=0.1, inner_lr=0.02)
    t = Trainer(cfg, run_dir, resume=True, allow_config_change=True, progress=False)
    assert t.iteration == 3
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.1]
    assert t.learner.inner_lr == 0.02  # type: ignore[union-attr]
    t.train()
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.1]
    state = load_checkpoint(run_dir)
    assert state["config"]["meta_lr"] == 0.1 and state["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert state["config_changes"] == [
        {"iteration": 3, "changes": {"inner_lr": [0.01, 0.02], "meta_lr": [0.001, 0.1]}}
    ]
    # the next resume compares with the new values: no flag needed for the same settings
    assert Trainer(cfg.replace(iterations=7), run_dir, resume=True, progress=False).train() == 7


def test_allow_config_change_to_cosine_follows_the_new_schedule(
    run_dir: Path, tiny_sinusoid: TrainConfig
) -> None:
    cfg = tiny_sinusoid.replace(lr_schedule="cosine", meta_lr=0.01, min_lr=1e-4, iterations=10)
    t = Trainer(cfg, run_dir, resume=True, allow_config_change=True, progress=False)

    def closed(step: int) -> float:
        return 1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi * step / 10)) / 2

    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(closed(3), rel=1e-9)
    for step in range(4, 11):
        t.train(until=step)
        assert t.optimizer.param_groups[0]["lr"] == pytest.approx(closed(step), rel=1e-9)


def test_seed_and_task_cannot_change_even_when_allowed(
    run_dir: Path, tiny_sinusoid: TrainConfig
) -> None:
    with pytest.raises(CheckpointError, match=r"cannot change seed: checkpoint 0, now 4"):
        Trainer(tiny_sinusoid.replace(seed=4), run_dir, resume=True, allow_config_change=True,
                progress=False)  # fmt: skip


def test_cli_resume_with_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run(["train", "sinusoid", "--output", str(out), *TINY]) == 0
    capsys.readouterr()
    changed = ["--inner-lr", "0.02", "--meta-batch", "3", "--k-shot", "5", "--lr-schedule",
               "cosine", "--meta-lr", "0.01"]  # fmt: skip
    argv = ["train", "--resume", "--output", str(out), *TINY[2:], "--iterations", "6", *changed]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metagrad train: error: ")
    for s in ("inner_lr: checkpoint 0.01, now 0.02", "meta_batch: checkpoint 2, now 3",
              "shots (--k-shot): checkpoint 10, now 5", "lr_schedule: checkpoint 'constant'",
              "meta_lr: checkpoint 0.001, now 0.01"):  # fmt: skip
        assert s in err[0]
    assert run([*argv, "--allow-config-change"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["meta_lr"] == 0.01 and res["config"]["shots"] == 5
    assert res["config_changes"][0]["iteration"] == 4
    assert res["config_changes"][0]["changes"]["meta_batch"] == [2, 3]
    assert "changed settings" in capsys.readouterr().err
    assert run(["train", "sinusoid", "--output", str(tmp_path / "new"), "--allow-config-change",
                *TINY]) == 2  # fmt: skip
    assert "applies to --resume only" in capsys.readouterr().err
