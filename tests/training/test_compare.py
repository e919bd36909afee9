"""``metagrad compare``: run folders side by side, cells as the README quotes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metagrad.cli import main
from metagrad.training import TrainConfig
from metagrad.training._compare import compare_table, load_run
from metagrad.training._config import ConfigError
from metagrad.training._evaluate import EvalResult, EvalRow
from metagrad.training._papers import PAPER_NUMBERS, setting_name
from metagrad.training._report import write_results


def _run(folder: Path, algorithm: str, task: str, rows: list[EvalRow], metric: str) -> Path:
    folder.mkdir(parents=True)
    cfg = TrainConfig(task=task, algorithm=algorithm, n_way=5)
    result = EvalResult(tasks=600, shots=1 if task == "omniglot" else 5, queries=15,
                        metric=metric, rows=rows)  # fmt: skip
    write_results(folder / "results.json", cfg, result, iteration=2000, train_time_s=754.0,
                  eval_time_s=30.0)  # fmt: skip
    return folder


def _acc(steps: int, acc: float, ci: float) -> EvalRow:
    return EvalRow(steps=steps, loss=0.1, loss_ci95=0.01, accuracy=acc, accuracy_ci95=ci)


def test_table_rows_cells_and_paper(tmp_path: Path) -> None:
    a = _run(tmp_path / "maml", "maml", "omniglot", [_acc(0, 0.2, 0.008), _acc(3, 0.9652, 0.0038)],
             "accuracy")  # fmt: skip
    b = _run(tmp_path / "anil", "anil", "omniglot", [_acc(1, 0.9, 0.005)], "accuracy")
    table = compare_table([load_run(a), load_run(b)])
    lines = table.splitlines()
    assert lines[0].split(" | ")[5:9] == [
        "accuracy, 0 steps", "accuracy, 1 step", "accuracy, 3 steps", "its paper |",
    ]  # fmt: skip
    assert "| maml | maml | 2,000 | 12.6 min |" in lines[2]
    assert (
        "20.00% ± 0.80% |  | 96.52% ± 0.38% | 98.70% ± 0.40% (Finn et al. 2017, Table 1) |"
        in (lines[2])
    )
    # ANIL's paper reports no 5-way number: an empty cell, not MAML's.
    assert lines[3].endswith("|  | 90.00% ± 0.50% |  |  |")
    assert compare_table([load_run(a)], steps=[3]).splitlines()[2].count("%") == 4


def test_a_run_on_other_classes_is_marked(tmp_path: Path) -> None:
    """A ``metagrad eval --eval-split train`` row names its classes; a test row is unmarked."""
    a = _run(tmp_path / "gap", "maml", "omniglot", [_acc(3, 0.98, 0.003)], "accuracy")
    data = json.loads((a / "results.json").read_text())
    assert "split" not in data["test"]
    data["test"]["split"] = "train"
    (a / "results.json").write_text(json.dumps(data))
    assert load_run(a).split == "train"
    assert compare_table([load_run(a)]).splitlines()[2].startswith("| gap (train classes) | maml |")


def test_regression_cells(tmp_path: Path) -> None:
    rows = [EvalRow(1, 0.6421, 0.0583), EvalRow(5, 0.2819, 0.0331)]
    run = load_run(_run(tmp_path / "s", "maml", "sinusoid", rows, "mse") / "results.json")
    assert run.setting == "sinusoid-5shot" and run.rows[5] == (0.2819, 0.0331)
    table = compare_table([run])
    assert "| 0.642 ± 0.058 | 0.282 ± 0.033 | 0.670 (Finn et al. 2017, Table 2, 1 step) |" in table


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no results\.json; pass a run folder"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"test": {}}))
    with pytest.raises(ConfigError, match=r"is not a metagrad results\.json"):
        load_run(tmp_path)
    with pytest.raises(ConfigError, match="no runs given"):
        compare_table([])
    a = _run(tmp_path / "a", "maml", "omniglot", [_acc(1, 0.9, 0.01)], "accuracy")
    b = _run(tmp_path / "b", "maml", "sinusoid", [EvalRow(1, 0.6, 0.05)], "mse")
    with pytest.raises(ConfigError, match="different metrics"):
        compare_table([load_run(a), load_run(b)])


def test_cli_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _run(tmp_path / "run", "fomaml", "omniglot", [_acc(3, 0.95, 0.004)], "accuracy")
    assert main(["compare", str(a)]) == 0
    out = capsys.readouterr().out
    assert "| run | fomaml | 2,000 |" in out and "98.30% ± 0.50% (Nichol et al. 2018)" in out
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "metagrad compare: error:" in capsys.readouterr().err


def test_paper_settings() -> None:
    assert setting_name({"task": "omniglot", "n_way": 20}, 1) == "omniglot-20w1s"
    assert setting_name({"task": "sinusoid"}, 10) is None
    assert setting_name({"task": "folder", "n_way": 5}, 1) is None
    for (algorithm, setting), p in PAPER_NUMBERS.items():
        assert 0 < p.value < 1 and (p.ci95 is None or 0 < p.ci95 < 0.01), (algorithm, setting)
