"""``metagrad train`` / ``metagrad eval`` through a parser built with the registrars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mg_cli import run_cli

TINY = ["--iterations", "4", "--meta-batch", "2", "--eval-tasks", "3", "--val-every", "2",
        "--log-every", "1", "--test-steps", "0,1,2", "--no-progress", "--no-plots"]  # fmt: skip


def run(argv: list[str]) -> int:
    return run_cli(argv)


def _one_line_error(capsys: pytest.CaptureFixture[str], cmd: str, match: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"metagrad {cmd}: error: ")
    assert match in err[-1]
    assert not any("Traceback" in line for line in err)


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run(["train", "sinusoid", "--output", str(out), "--algorithm", "fomaml", *TINY]) == 0
    text = capsys.readouterr().out
    assert "fomaml on sinusoid, 4 meta-iterations" in text and "3 tasks, 5-shot" in text
    res = json.loads((out / "results.json").read_text())
    assert res["algorithm"] == "fomaml" and res["iterations"] == 4
    assert [r["steps"] for r in res["test"]["rows"]] == [0, 1, 2]
    assert res["paper"]["values"]["1"] == 0.67
    assert (out / "metrics.csv").exists() and (out / "checkpoint.pt").exists()
    # resume with more iterations continues the same run
    assert run(["train", "--output", str(out), "--resume", *TINY[2:], "--iterations", "5"]) == 0
    assert json.loads((out / "results.json").read_text())["iterations"] == 5
    capsys.readouterr()
    assert run(["eval", str(out / "checkpoint.pt"), "--tasks", "4", "--test-steps", "0,3"]) == 0
    assert "4 tasks, 5-shot" in capsys.readouterr().out
    assert run(["eval", str(out), "--algorithm", "maml"]) == 2
    _one_line_error(capsys, "eval", "trained with algorithm 'fomaml', not 'maml'")


def test_config_file_and_flag_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "sinusoid"\nalgorithm = "anil"\nmeta_batch = 3\ninner_lr = 0.02\n')
    out = tmp_path / "run"
    assert run(["train", "--config", str(cfg), "--output", str(out), "--inner-lr", "0.03",
                "--iterations", "2", "--eval-tasks", "2", "--no-progress"]) == 0  # fmt: skip
    c = json.loads((out / "results.json").read_text())["config"]
    assert (c["algorithm"], c["meta_batch"], c["inner_lr"]) == ("anil", 3, 0.03)


def test_train_omniglot_and_folder(
    tmp_path: Path, omniglot_zips: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--hidden", "4", "--image-size", "16", "--n-way", "3", "--queries", "1",
             "--eval-queries", "1", *TINY]  # fmt: skip
    assert run(["train", "omniglot", "--data", str(omniglot_zips), "--output",
                str(tmp_path / "o"), *small]) == 0  # fmt: skip
    assert "query accuracy" in capsys.readouterr().out
    assert run(["train", "folder", "--data", str(image_folder), "--output", str(tmp_path / "f"),
                "--algorithm", "reptile", "--split", "0.5,0.25,0.25", *small, "--n-way", "2"]) == 0  # fmt: skip


def test_cg_damping_reaches_the_imaml_learner(tmp_path: Path) -> None:
    from metagrad.models import sinusoid_mlp
    from metagrad.training._build import make_learner
    from metagrad.training._config import TrainConfig

    out = tmp_path / "imaml"
    assert run(["train", "sinusoid", "--algorithm", "imaml", "--cg-damping", "0.5", "--output",
                str(out), *TINY]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["config"]["cg_damping"] == 0.5
    cfg = TrainConfig(algorithm="imaml", cg_damping=0.5)
    assert make_learner(cfg, sinusoid_mlp()).cg_damping == 0.5
    from metagrad.training._config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"cg_damping=-1.0 must be a finite number >= 0"):
        validate(cfg.replace(cg_damping=-1.0))


def test_imaml_eval_lam_in_train_and_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--imaml-eval-lam reaches the learner and results.json, and eval may override it: the
    same checkpoint scores differently with and without the proximal term at test time."""
    out = tmp_path / "imaml"
    assert run(["train", "sinusoid", "--algorithm", "imaml", "--inner-steps", "3",
                "--imaml-eval-lam", "0", "--output", str(out), *TINY]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["config"]["imaml_eval_lam"] == 0.0
    capsys.readouterr()

    def loss_after_2(extra: list[str]) -> float:
        assert run(["eval", str(out), "--tasks", "3", "--test-steps", "2", "--json", *extra]) == 0
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
        return float(row["loss"])

    plain, prox = loss_after_2([]), loss_after_2(["--imaml-eval-lam", "50"])
    assert plain == loss_after_2([]) and plain != prox
    with pytest.raises(SystemExit):
        run(["eval", str(out), "--imaml-eval-lam", "-1"])
    assert "--imaml-eval-lam: expected a number >= 0, got '-1'" in capsys.readouterr().err
    maml = tmp_path / "maml"
    assert run(["train", "sinusoid", "--output", str(maml), *TINY]) == 0
    capsys.readouterr()
    assert run(["eval", str(maml), "--imaml-eval-lam", "0"]) == 2
    _one_line_error(capsys, "eval", "imaml_eval_lam applies to iMAML; algorithm='maml'")


def test_train_fraction_is_recorded_and_shrinks_the_training_classes(
    tmp_path: Path, omniglot_zips: Path
) -> None:
    from metagrad.training._build import load_splits
    from metagrad.training._config import TrainConfig

    small = ["--hidden", "4", "--image-size", "16", "--n-way", "3", "--queries", "1",
             "--eval-queries", "1", "--split", "0.5,0.25,0.25", *TINY]  # fmt: skip
    out = tmp_path / "half"
    assert run(["train", "omniglot", "--data", str(omniglot_zips), "--output", str(out),
                "--train-fraction", "0.5", *small]) == 0  # fmt: skip
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert cfg["train_fraction"] == 0.5
    base = TrainConfig(task="omniglot", data=str(omniglot_zips), split=[0.5, 0.25, 0.25],
                       image_size=16)  # fmt: skip
    full, half = load_splits(base), load_splits(base.replace(train_fraction=0.5))
    assert (full.get("train").num_classes, half.get("train").num_classes) == (8, 4)
    assert torch.equal(full.get("test").images, half.get("test").images)


def test_eval_split_train_scores_training_classes_at_test_sizes(
    tmp_path: Path, omniglot_zips: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--eval-split train``: tasks of the meta-training classes with the test's shots and
    queries, marked in the title and results.json; the default test evaluation is unchanged."""
    from metagrad.training._build import make_sampler
    from metagrad.training._trainer import Trainer

    small = ["--hidden", "4", "--image-size", "16", "--n-way", "3", "--queries", "1",
             "--eval-queries", "2", "--split", "0.5,0.25,0.25", *TINY]  # fmt: skip
    out = tmp_path / "run"
    assert run(["train", "omniglot", "--data", str(omniglot_zips), "--output", str(out),
                *small]) == 0  # fmt: skip
    capsys.readouterr()

    def scores(extra: list[str], where: Path) -> dict:
        assert run(["eval", str(out), "--output", str(where), "--no-plots", *extra]) == 0
        return json.loads((where / "results.json").read_text())["test"]

    test = scores([], tmp_path / "test")
    assert "split" not in test and "split's classes" not in capsys.readouterr().out
    train = scores(["--eval-split", "train"], tmp_path / "train")
    assert "tasks of the train split's classes" in capsys.readouterr().out
    assert train["split"] == "train" and train["queries"] == 2  # the test's size, not 1
    assert train == scores(["--eval-split", "train"], tmp_path / "again")  # deterministic
    assert train["rows"] != test["rows"]

    trainer = Trainer.from_checkpoint(out / "checkpoint.pt")
    sampler = make_sampler(trainer.cfg, trainer.splits, "train", seed=1, eval_sizes=True)
    _, _, xq, _ = sampler.sample(2)
    assert xq.shape[1] == 3 * 2  # n_way x eval queries
    as_bytes = (xq * 255).round().to(torch.uint8).flatten(2)
    for split, inside in (("train", True), ("test", False)):
        pool = trainer.splits.get(split).images.flatten(1)
        hit = (as_bytes.unsqueeze(-2) == pool).all(-1).any(-1)  # [tasks, queries]
        assert bool(hit.all() if inside else not hit.any()), split


def test_eval_split_refused_for_sinusoid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sin"
    assert run(["train", "sinusoid", "--output", str(out), *TINY]) == 0
    capsys.readouterr()
    assert run(["eval", str(out), "--eval-split", "train"]) == 2
    _one_line_error(capsys, "eval", "--eval-split train needs a task with class splits")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "sinusoidal"], "unknown preset 'sinusoidal'"),
        (["train", "omniglot", "--data", "/nonexistent/omni.zip"], "does not exist"),
        (["train", "folder"], "needs a data path"),
        (["train", "sinusoid", "--inner-lr", "-1"], "inner_lr=-1.0"),
        (["train", "sinusoid", "--train-fraction", "0.5"], "train_fraction=0.5 applies to image"),
        (
            ["train", "folder", "--data", "/nonexistent", "--train-fraction", "1.5"],
            "train_fraction=1.5 must be a number in (0, 1]",
        ),
        (["train", "sinusoid", "--config", "/nonexistent.toml"], "does not exist"),
        (["eval", "/nonexistent/checkpoint.pt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    full = argv + (["--output", str(tmp_path / "o")] if argv[0] == "train" else [])
    assert run(full) == 2
    _one_line_error(capsys, argv[0], match)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_unknown_algorithm_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run(["train", "sinusoid", "--algorithm", "maml3"])
    assert e.value.code == 2
    assert "invalid choice: 'maml3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["train", "sinusoid", "--meta-batch", "0"])
    assert "expected an integer > 0" in capsys.readouterr().err


def test_data_errors_via_cli(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "folder", "--data", str(image_folder), "--no-progress", *TINY[:4]]
    assert run([*base, "--output", str(tmp_path / "a"), "--n-way", "30"]) == 2
    _one_line_error(capsys, "train", "n_way=30 but the data has only")
    assert run([*base, "--output", str(tmp_path / "b"), "--n-way", "2", "--k-shot", "3",
                "--queries", "5"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "images per class are needed" in err and "class_0" in err
    (image_folder / "class_01" / "img_2.png").write_bytes(b"not a png")
    assert run([*base, "--output", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "train", "img_2.png")
    zipfile = tmp_path / "fake.zip"
    zipfile.write_bytes(b"nope")
    assert run(["train", "omniglot", "--data", str(zipfile), "--output", str(tmp_path / "d")]) == 2
    _one_line_error(capsys, "train", "not a zip archive")


def test_unwritable_output_and_existing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert run(["train", "sinusoid", "--output", str(blocker / "x"), *TINY]) == 2
    _one_line_error(capsys, "train", "not writable")
    out = tmp_path / "run"
    assert run(["train", "sinusoid", "--output", str(out), *TINY]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert run(["train", "sinusoid", "--output", str(out), *TINY]) == 2
    _one_line_error(capsys, "train", "already holds a training checkpoint")
    assert run(["train", "sinusoid", "--output", str(out), "--resume", "--algorithm",
                "metasgd", *TINY]) == 2  # fmt: skip
    _one_line_error(capsys, "train", "algorithm 'maml' but this run uses 'metasgd'")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert (
        run(["train", "sinusoid", "--output", str(out), "--overwrite", *TINY, "--seed", "3"]) == 0
    )
    assert (out / "checkpoint.pt").read_bytes() != before


def test_eval_of_one_task_has_no_confidence_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert run(["train", "sinusoid", "--output", str(out), *TINY]) == 0
    capsys.readouterr()
    assert run(["eval", str(out), "--tasks", "1"]) == 0
    text = capsys.readouterr().out
    assert "1 task, 5-shot" in text and "+- n/a" in text and "needs at least 2 tasks" in text
    assert "+- 0.0000" not in text
