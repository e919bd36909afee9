"""Training options added on top of the pipeline: compile, iMAML, the checkpoint strategy."""

from __future__ import annotations

import pytest

from metagrad.algorithms import IMAML
from metagrad.cli import main
from metagrad.training import ConfigError, TrainConfig, Trainer
from metagrad.training._build import make_learner
from metagrad.training._config import validate


def test_compile_reaches_the_learner(tiny_sinusoid: TrainConfig) -> None:
    t = Trainer(tiny_sinusoid.replace(compile=True), progress=False)
    assert t.learner.use_compile is True  # type: ignore[union-attr]


@pytest.mark.parametrize("algorithm", ["reptile", "imaml"])
def test_compile_is_refused_outside_the_maml_family(
    tiny_sinusoid: TrainConfig, algorithm: str
) -> None:
    with pytest.raises(ConfigError, match="compile=True applies to the MAML family"):
        validate(tiny_sinusoid.replace(compile=True, algorithm=algorithm))


def test_imaml_options(tiny_sinusoid: TrainConfig) -> None:
    cfg = tiny_sinusoid.replace(algorithm="imaml", imaml_lam=2.0, cg_steps=3)
    learner = make_learner(cfg, Trainer(cfg, progress=False).model)
    assert isinstance(learner, IMAML) and learner.lam == 2.0 and learner.cg_steps == 3
    with pytest.raises(ConfigError, match="imaml_lam"):
        validate(cfg.replace(imaml_lam=0.0))


def test_checkpoint_strategy_trains(tiny_sinusoid: TrainConfig) -> None:
    t = Trainer(
        tiny_sinusoid.replace(strategy="checkpoint", inner_steps=3, iterations=2), progress=False
    )
    assert t.train() == 2


def test_train_is_wired_into_the_main_cli(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(
        ["train", "sinusoid", "--iterations", "2", "--eval-tasks", "5", "--meta-batch", "2",
         "--no-progress", "--no-plots", "--output", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "run" / "results.json").exists()
    assert "query MSE" in capsys.readouterr().out


def test_eval_trace_writes_csv_and_png(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert main(["train", "sinusoid", "--iterations", "2", "--eval-tasks", "4", "--meta-batch", "2",
                 "--no-progress", "--no-plots", "--output", str(run)]) == 0  # fmt: skip
    out = tmp_path / "eval"
    assert main(["eval", str(run / "checkpoint.pt"), "--tasks", "4", "--test-steps", "0,3",
                 "--trace", "3", "--output", str(out)]) == 0  # fmt: skip
    lines = (out / "trace.csv").read_text().strip().splitlines()
    assert lines[0].startswith("task,step") and len(lines) == 1 + 3 * 4  # 3 tasks x steps 0..3
    assert (out / "trace.png").stat().st_size > 1000
