"""A training loop that talks: validation where the run was trained, live metrics, callbacks,
plots that never fail a finished run, and the CLI frictions of issues 20 and 22."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from metagrad.training import Callback, TrainConfig, Trainer
from metagrad.training._cli import add_eval_parser, add_train_parser, build_config

TINY = ["--iterations", "4", "--meta-batch", "2", "--eval-tasks", "3", "--val-every", "2",
        "--val-tasks", "3", "--log-every", "1", "--test-steps", "0,1,2", "--no-progress"]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metagrad")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    code: int = args.handler(args)
    return code


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_validation_at_the_training_step_count_by_default(tiny_sinusoid: TrainConfig) -> None:
    assert tiny_sinusoid.validation_steps == tiny_sinusoid.inner_steps == 1
    assert tiny_sinusoid.replace(val_steps=2).validation_steps == 2
    t = Trainer(tiny_sinusoid.replace(algorithm="metasgd"), progress=False)
    assert [r.steps for r in t.validate().rows] == [1]


def test_metasgd_run_has_finite_val_loss_and_exits_0_with_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: val_loss NaN in every row (validated at 10 steps) and exit 2 from the fits plot."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    argv = ["train", "sinusoid", "--algorithm", "metasgd", "--inner-lr", "2.0",
            "--output", str(out), *TINY, "--test-steps", "0,1,10"]  # fmt: skip
    assert run(argv) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    val = [r for r in _rows(out / "metrics.csv") if r["val_loss"]]
    assert val and all(float(r["val_loss"]) == float(r["val_loss"]) for r in val)  # not NaN
    assert {r["val_steps"] for r in val} == {"1"}
    assert (out / "learning_curves.png").exists() and (out / "results.json").exists()
    if "diverged" in captured.err:  # the fits plot says so as a warning, not blaming the data
        assert "warning: sinusoid_fits.png" in captured.err and "not a data problem" in captured.err


def test_a_failing_plot_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    import metagrad.training._plots as plots

    def boom(*a: Any, **k: Any) -> Path:
        raise RuntimeError("drawing exploded")

    monkeypatch.setattr(plots, "plot_sinusoid_fits", boom)
    out = tmp_path / "run"
    assert run(["train", "sinusoid", "--output", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert (
        "metagrad train: warning: sinusoid_fits.png skipped: RuntimeError: drawing exploded" in err
    )
    assert (out / "learning_curves.png").exists() and (out / "checkpoint.pt").exists()


def test_train_accuracy_and_val_accuracy_logged(tmp_path: Path, omniglot_zips: Path) -> None:
    small = ["--hidden", "4", "--image-size", "16", "--n-way", "3", "--queries", "1",
             "--eval-queries", "1", "--no-plots", *TINY]  # fmt: skip
    out = tmp_path / "o"
    assert (
        run(["train", "omniglot", "--data", str(omniglot_zips), "--output", str(out), *small]) == 0
    )
    val = [r for r in _rows(out / "metrics.csv") if r["val_loss"]]
    assert val
    for r in val:
        assert 0.0 <= float(r["val_accuracy"]) <= 1.0 and 0.0 <= float(r["train_accuracy"]) <= 1.0


def test_progress_line_shows_validation(
    tiny_sinusoid: TrainConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name: str, *a: Any, **k: Any) -> Any:
        if name == "tqdm":
            raise ImportError("no tqdm here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    Trainer(tiny_sinusoid, progress=True).train()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "meta-train 6/6" in last and "  val " in last


def test_callbacks_receive_rows_validations_and_the_end(tiny_sinusoid: TrainConfig) -> None:
    seen: dict[str, list[Any]] = {"log": [], "val": [], "end": []}

    class Tracker(Callback):
        def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
            seen["log"].append(row)

        def on_validation(self, trainer: Any, result: Any) -> None:
            seen["val"].append(result)

        def on_train_end(self, trainer: Any) -> None:
            seen["end"].append(trainer.iteration)

    Trainer(tiny_sinusoid, progress=False, callbacks=[Tracker()]).train()
    assert [r["iteration"] for r in seen["log"]] == [2, 3, 4, 6]
    assert len(seen["val"]) == 2 and seen["end"] == [6]
    assert "val_loss" in seen["log"][1]


def test_learning_curves_legend_names_steps_and_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from metagrad.training import plot_learning_curves

    m = tmp_path / "metrics.csv"
    m.write_text(
        "iteration,train_loss,val_loss,val_loss_ci95,val_accuracy,val_accuracy_ci95,val_steps\n"
        "1,2.0,1.5,0.1,0.5,0.05,3\n2,1.0,1.2,0.1,0.6,0.05,3\n"
    )
    captured: list[Any] = []
    real_savefig = plt.Figure.savefig

    def keep(fig: Any, *a: Any, **k: Any) -> Any:
        captured.append(fig)
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plot_learning_curves(m, tmp_path / "c.png")
    labels = [t.get_text() for ax in captured[0].axes for t in ax.get_legend().get_texts()]
    assert "validation loss after 3 steps" in labels and "95% CI" in labels
    assert "validation accuracy after 3 steps" in labels


def test_eval_json_evaluates_once(
    tmp_path: Path,
    count_calls: Callable[[object, str], list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    assert run(["train", "sinusoid", "--output", str(out), *TINY, "--no-plots"]) == 0
    calls = count_calls(Trainer, "evaluate")
    capsys.readouterr()
    assert run(["eval", str(out), "--tasks", "2", "--json"]) == 0
    assert len(calls) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["tasks"] == 2


def test_omniglot_data_from_env_var_only(
    tmp_path: Path, omniglot_zips: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METAGRAD_DATA", raising=False)
    args = _parser().parse_args(["train", "omniglot"])
    with pytest.raises(ValueError, match="METAGRAD_DATA"):
        build_config(args)
    monkeypatch.setenv("METAGRAD_DATA", str(omniglot_zips))
    assert build_config(args).data == str(omniglot_zips.resolve())
    # --data wins over the environment
    args = _parser().parse_args(["train", "omniglot", "--data", str(tmp_path)])
    assert build_config(args).data == str(tmp_path.resolve())


def test_shots_flag_alias_and_config_key_alias(tmp_path: Path) -> None:
    assert build_config(_parser().parse_args(["train", "sinusoid", "--shots", "7"])).shots == 7
    assert build_config(_parser().parse_args(["train", "sinusoid", "--k-shot", "6"])).shots == 6
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "sinusoid"\nk_shot = 3\n')
    assert build_config(_parser().parse_args(["train", "--config", str(cfg)])).shots == 3
    cfg.write_text('preset = "sinusoid"\nk_shot = 3\nshots = 4\n')
    with pytest.raises(ValueError, match="given twice"):
        build_config(_parser().parse_args(["train", "--config", str(cfg)]))


def test_val_steps_flag_and_strategies(tmp_path: Path) -> None:
    cfg = build_config(_parser().parse_args(["train", "sinusoid", "--val-steps", "3"]))
    assert cfg.validation_steps == 3
    cfg = build_config(_parser().parse_args(["train", "sinusoid", "--strategy", "checkpoint"]))
    assert cfg.strategy == "checkpoint"


def test_eval_help_says_95_percent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "95% CI" in text and "95%%" not in text


def test_debug_is_passed_explicitly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metagrad import cli

    missing = str(tmp_path / "nope")
    assert cli.main(["--debug", "eval", missing]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["eval", missing]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_quiet_and_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metagrad import cli
    from metagrad.training._cli import cli_logging

    log = logging.getLogger("metagrad")
    with cli_logging("x", logging.ERROR):
        log.warning("hidden")
        log.error("shown")
    with cli_logging("x", logging.DEBUG):
        log.debug("dbg")
    err = capsys.readouterr().err
    assert "hidden" not in err and "metagrad x: error: shown" in err and "debug: dbg" in err
    parser = cli.build_parser()
    assert parser.parse_args(["--quiet", "explain"]).quiet
    assert parser.parse_args(["-v", "explain"]).verbose


def test_nan_parameters_at_save_get_outer_loop_advice(
    tiny_sinusoid: TrainConfig, tmp_path: Path
) -> None:
    import torch

    from metagrad import NonFiniteError

    t = Trainer(tiny_sinusoid, tmp_path / "run", progress=False)
    with torch.no_grad():
        next(iter(t.learner.parameters())).fill_(float("nan"))
    with pytest.raises(NonFiniteError) as info:
        t.save()
    msg = str(info.value)
    assert "meta-parameters" in msg and "--meta-lr" in msg and "checkpoint was not written" in msg
    assert "inner learning rate" not in msg and "task" not in msg
