"""``metagrad train navigation``: run folder, results, atomic checkpoints, bit-exact resume."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from mg_cli import run_cli

from metagrad.cli import main
from metagrad.rl._train import NavigationConfig, NavigationTrainer
from metagrad.training._checkpoint import load_checkpoint

TINY = ["--meta-batch", "2", "--trajectories", "2", "--horizon", "4", "--hidden", "4",
        "--eval-tasks", "3", "--fisher-tasks", "1", "--no-progress"]  # fmt: skip


def run(argv: list[str]) -> int:
    return run_cli(argv)


def tiny(**changes: object) -> NavigationConfig:
    cfg = NavigationConfig(meta_batch=2, trajectories=2, horizon=4, hidden=4, iterations=3,
                           pretrain_iterations=2, eval_tasks=3, fisher_tasks=1,
                           checkpoint_every=100)  # fmt: skip
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run(["train", "navigation", "--iterations", "1", "--output", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "MAML (trpo) on 2D navigation: 1 meta-iterations" in text and "pretrained" in text
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "navigation" and res["iterations"] == 1
    assert res["pretrain_iterations"] == 1  # default: as many as MAML
    assert set(res["policies"]) == {"maml", "pretrained", "random"}
    assert [r["steps"] for r in res["test"]["rows"]] == [0, 1, 2, 3]
    row = res["test"]["rows"][1]
    assert row["loss"] == -row["return"] and row["return_ci95"] > 0
    assert [d["steps"] for d in res["differences"]["maml_minus_pretrained"]] == [0, 1, 2, 3]
    for name in ("checkpoint.pt", "navigation_returns.png", "learning_curves.png"):
        assert (out / name).exists(), name
    assert [r["phase"] for r in _rows(out)] == ["maml", "pretrained"]
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["task"] == "navigation" and ckpt["iteration"] == 1
    # the same folder again without --resume is refused, nothing overwritten
    assert run(["train", "navigation", "--iterations", "1", "--output", str(out), *TINY]) == 2
    assert "already holds a training checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("outer", ["trpo", "adam"])
def test_resume_is_bit_exact(tmp_path: Path, outer: str) -> None:
    straight = NavigationTrainer(tiny(outer=outer, meta_lr=0.01), tmp_path / "a")
    straight.train()
    part = NavigationTrainer(tiny(outer=outer, meta_lr=0.01), tmp_path / "b")
    assert part.train(max_iterations=2) is False  # stops inside the MAML phase, saved
    resumed = NavigationTrainer(tiny(outer=outer, meta_lr=0.01), tmp_path / "b", resume=True)
    assert resumed.phases["maml"].iteration == 2
    assert resumed.train() is True
    for name in ("maml", "pretrained"):
        a, b = straight.phases[name], resumed.phases[name]
        assert a.iteration == b.iteration
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k]), (name, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "a")) == strip(_rows(tmp_path / "b"))
    assert straight.evaluate() == resumed.evaluate()


def test_interrupt_mid_iteration_rolls_back_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = NavigationTrainer(tiny(), tmp_path / "a")
    straight.train()
    t = NavigationTrainer(tiny(), tmp_path / "b")
    phase = t.phases["maml"]
    original = type(phase)._step
    calls = []

    def flaky(self: object, env: object, sigint: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # a second Ctrl-C in the middle of iteration 2 (after sampling)
            self.generator.manual_seed(123)  # type: ignore[attr-defined]  # draws consumed
            raise KeyboardInterrupt
        return original(self, env, sigint)  # type: ignore[arg-type]

    monkeypatch.setattr(type(phase), "_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    monkeypatch.setattr(type(phase), "_step", original)
    assert load_checkpoint(tmp_path / "b")["iteration"] == 1
    resumed = NavigationTrainer(tiny(), tmp_path / "b", resume=True)
    resumed.train()
    for k, v in straight.phases["maml"].params.items():
        assert torch.equal(v, resumed.phases["maml"].params[k])


def test_cli_resume_reuses_the_runs_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "navigation", "--output", str(out), "--no-plots", *TINY]
    assert run([*args, "--iterations", "1", "--pretrain-iterations", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["policies"]) == {"maml", "random"}  # no pretrained baseline asked for
    # `--resume --output DIR` alone: the checkpoint's settings, more iterations allowed
    assert run(["train", "--resume", "--output", str(out), "--iterations", "2", "--no-plots",
                "--no-progress"]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["iterations"] == 2
    # a changed setting is refused, naming it
    capsys.readouterr()
    assert run([*args, "--resume", "--iterations", "3", "--inner-lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "inner_lr: checkpoint 0.1, now 0.5" in err and "Fix:" in err


def test_flags_that_belong_to_another_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["train", "navigation", "--n-way", "5", *TINY]) == 2
    assert "--n-way do(es) not apply to the navigation task" in capsys.readouterr().err
    assert run(["train", "sinusoid", "--trajectories", "5", "--no-progress"]) == 2
    assert "--trajectories apply to the navigation task only" in capsys.readouterr().err


def test_bad_navigation_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--output", str(tmp_path / "r0")]
    assert run(["train", "navigation", *TINY, "--trajectories", "0", *out]) == 2
    assert "trajectories=0 must be an int >= 1" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "navigation"\nhorizn = 5\n')
    assert run(["train", "--config", str(cfg), "--output", str(tmp_path / "r")]) == 2
    assert "unknown setting(s) ['horizn']" in capsys.readouterr().err


def test_config_file_selects_navigation(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "navigation", "iterations": 1, "pretrain_iterations": 1,
                               "meta_batch": 2, "trajectories": 2, "horizon": 3, "hidden": 3,
                               "eval_tasks": 2, "outer": "adam"}))  # fmt: skip
    out = tmp_path / "r"
    assert run(["train", "--config", str(cfg), "--output", str(out), "--no-plots",
                "--no-progress"]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["algorithm"] == "maml-adam" and res["config"]["horizon"] == 3


def test_eval_of_a_navigation_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    trainer = NavigationTrainer(tiny(iterations=1, pretrain_iterations=1), out)
    trainer.train()
    assert run(["eval", str(out), "--tasks", "2", "--test-steps", "0,1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trainer.cfg.eval_tasks, trainer.cfg.test_steps = 2, [0, 1]
    assert printed == json.loads(json.dumps(trainer.evaluate()))
    ev = tmp_path / "eval"
    assert run(["eval", str(out), "--tasks", "2", "--seed", "5", "--output", str(ev)]) == 0
    assert (ev / "results.json").exists() and (ev / "navigation_returns.png").exists()
    assert run(["eval", str(out), "--trace", "3"]) == 2
    assert "do(es) not apply to a navigation checkpoint" in capsys.readouterr().err


def test_progress_goes_through_the_metagrad_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="metagrad")
    NavigationTrainer(tiny(iterations=2, pretrain_iterations=1), progress=True).train()
    lines = [r.getMessage() for r in caplog.records if r.name == "metagrad"]
    assert [m.split(":")[0] for m in lines] == [
        "navigation maml 1/2", "navigation maml 2/2", "navigation pretrained 1/1",
    ]  # fmt: skip
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert "return before" in lines[0] and "s/it" in lines[0]
    caplog.clear()
    NavigationTrainer(tiny(iterations=1, pretrain_iterations=0), progress=False).train()
    assert not caplog.records


def test_quiet_silences_the_progress_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "navigation", "--iterations", "1", "--pretrain-iterations", "0",
            "--no-plots", *[a for a in TINY if a != "--no-progress"]]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "metagrad train: navigation maml 1/1: return before" in captured.err
    assert "MAML (trpo) on 2D navigation" in captured.out  # the result table is not a message
    assert main(["--quiet", *args, "--output", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert "navigation maml" not in captured.err and "MAML (trpo)" in captured.out
