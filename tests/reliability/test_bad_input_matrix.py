"""Bad-input kinds not covered elsewhere: out-of-range labels, wrong device, non-image files,
an empty zip. Each must give an error naming the problem and the fix."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad.tasks import DatasetError, load_image_folder
from metagrad.tasks._omniglot import read_omniglot_files


def _clf_tasks(bad_label: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    ys = torch.arange(3).repeat(2, 2)
    yq = ys.clone()
    if bad_label is not None:
        ys[1, 2] = bad_label
    return xs, ys, xq, yq


@pytest.mark.parametrize("strategy", ["loop", "vmap", "hvp_chain"])
@pytest.mark.parametrize("bad", [3, -7])
def test_labels_outside_range(strategy: str, bad: int) -> None:
    learner = mg.MAML(nn.Linear(4, 3), F.cross_entropy, 0.1, 1, strategy=strategy)
    learner.meta_loss(*_clf_tasks())  # in range: fine
    with pytest.raises(
        ValueError,
        match=r"metagrad\.MAML: loss_fn raised (IndexError|RuntimeError).*\[0, number of classes\)",
    ):
        learner.meta_loss(*_clf_tasks(bad))


def test_task_tensors_on_another_device() -> None:
    learner = mg.MAML(nn.Linear(4, 3), F.cross_entropy, 0.1, 1)
    xs, ys, xq, yq = _clf_tasks()
    with pytest.raises(ValueError, match=r"xs is on meta but the model is on cpu.*\.to\('cpu'\)"):
        learner.meta_loss(xs.to("meta"), ys, xq, yq)


def test_non_image_files_in_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    for c in range(3):
        d = tmp_path / f"class{c}"
        d.mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (c * 40, i * 40, 0)).save(d / f"{i}.png")
    (tmp_path / "class0" / "notes.txt").write_text("not an image")
    (tmp_path / "class1" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "class1" / "broken.png").unlink()
    data = load_image_folder(tmp_path)  # the .txt file is not an image: ignored
    assert data.num_classes == 3 and len(data.targets) == 9


def test_empty_zip(tmp_path: Path) -> None:
    z = tmp_path / "images_background_small1.zip"
    with zipfile.ZipFile(z, "w"):
        pass
    with pytest.raises(DatasetError, match="not Omniglot-shaped"):
        read_omniglot_files(z)


# ----------------------------------------------------------------------------------------------
# The CLI matrix: every bad input below must end `metagrad train|eval` with status 2 and one
# line `metagrad <cmd>: error: ...` naming the key/flag and the value (no traceback), before any
# long work. README's reliability section quotes the count (len(CLI_CASES)).

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
from typing import Any  # noqa: E402

from mg_image_fixtures import make_image_folder, make_omniglot_zips  # noqa: E402

from metagrad.cli import main  # noqa: E402
from metagrad.training import TrainConfig  # noqa: E402
from metagrad.training._checkpoint import save_checkpoint  # noqa: E402

# A wrong-typed value of each kind, as a JSON/TOML config file would hold it.
WRONG = {"bool": ["no", 1], "int": ["5", 1.5, True], "float": ["x", True], "str": [5, ["a"]],
         "list[int]": ["all", [1.5]], "list[float]": ["0.5,0.5", ["a", "b", "c"]]}  # fmt: skip


def _kind(f: dataclasses.Field[Any]) -> str:
    return str(f.type).removesuffix(" | None")


TYPE_CASES = [
    (f"type-{f.name}-{v!r}", {f.name: v}, f"{f.name}={v!r} has the wrong type")
    for f in dataclasses.fields(TrainConfig)
    for v in WRONG[_kind(f)]
]
# Values of the right type but out of range or unknown (config file).
RANGE_CASES = [
    (f"range-{k}-{v!r}", {k: v}, frag)
    for k, v, frag in [
        ("n_way", 0, "n_way=0 must be an int >= 1"), ("shots", 0, "shots=0"),
        ("queries", -1, "queries=-1"), ("eval_shots", 0, "eval_shots=0"),
        ("eval_queries", 0, "eval_queries=0"), ("hidden", 0, "hidden=0"),
        ("image_size", 0, "image_size=0"), ("split_seed", -1, "split_seed=-1"),
        ("inner_steps", -1, "inner_steps=-1"), ("first_order_steps", -1, "first_order_steps=-1"),
        ("cg_steps", 0, "cg_steps=0"), ("meta_batch", 0, "meta_batch=0"),
        ("iterations", 0, "iterations=0"), ("seed", -1, "seed=-1"), ("val_every", 0, "val_every=0"),
        ("val_tasks", 0, "val_tasks=0"), ("eval_tasks", 0, "eval_tasks=0"),
        ("log_every", 0, "log_every=0"), ("checkpoint_every", 0, "checkpoint_every=0"),
        ("inner_lr", -1, "inner_lr=-1"), ("inner_lr", float("nan"), "inner_lr=nan"),
        ("meta_lr", 0, "meta_lr=0"), ("meta_lr", -1.0, "meta_lr=-1.0"),
        ("meta_lr", float("inf"), "meta_lr=inf"), ("min_lr", -1, "min_lr=-1"),
        ("clip_grad", 0, "clip_grad=0"), ("imaml_lam", 0, "imaml_lam=0"),
        ("imaml_lam", float("inf"), "imaml_lam=inf"), ("task", "cifar", "task='cifar'"),
        ("algorithm", "maml3", "algorithm='maml3'"), ("strategy", "fast", "strategy='fast'"),
        ("lr_schedule", "step", "lr_schedule='step'"), ("nan_policy", "ignore", "nan_policy='ignore'"),
        ("device", "bogus", "device='bogus' is not a torch device"),
        ("device", "meta", "device='meta' holds shapes only"), ("device", "", "device=''"),
        ("device", "cuda:7", "device='cuda:7'"), ("test_steps", [], "test_steps=[]"),
        ("test_steps", [-1], "test_steps entry=-1"), ("rotations", [45], "rotations=[45]"),
        ("rotations", [0, 360], "rotations=[0, 360]"), ("rotations", [], "rotations=[]"),
        ("split", [0.5, 0.5], "split=[0.5, 0.5]"), ("split", [0.5, 0.6, 0.2], "split=[0.5, 0.6"),
        ("split", [-0.1, 0.6, 0.5], "split=[-0.1"), ("inner_rate", 0.1, "unknown setting 'inner_rate'"),
    ]
] + [
    ("range-preset", {"preset": "sinus"}, "unknown preset 'sinus'"),
    ("range-compile-reptile", {"compile": True, "algorithm": "reptile"}, "compile=True applies"),
    ("range-folder-no-data", {"task": "folder"}, "needs a data path"),
    ("range-image-size-3", {"preset": "omniglot", "data": "/nonexistent", "image_size": 3},
     "image_size=3 is too small for conv-4"),
    ("range-reptile-0-steps", {"preset": "omniglot", "data": "/nonexistent", "algorithm": "reptile",
                               "inner_steps": 0}, "reptile' needs inner_steps >= 1"),
]  # fmt: skip
_T = ["train", "sinusoid"]
# Flags: argparse usage errors (the flag and the expected form) and validated values.
FLAG_CASES = [
    (f"flag-{'-'.join(a).strip('-')}", [*_T, *a], frag)
    for a, frag in [
        (["--iterations", "0"], "argument --iterations: expected an integer > 0"),
        (["--iterations", "x"], "argument --iterations: expected an integer"),
        (["--seed", "-1"], "argument --seed"), (["--meta-batch", "0"], "argument --meta-batch"),
        (["--inner-steps", "-1"], "argument --inner-steps"), (["--inner-lr", "x"], "argument --inner-lr"),
        (["--meta-lr", "x"], "argument --meta-lr"), (["--strategy", "fast"], "argument --strategy"),
        (["--n-way", "0"], "argument --n-way"), (["--k-shot", "0"], "argument --k-shot"),
        (["--queries", "0"], "argument --queries"), (["--eval-shots", "0"], "argument --eval-shots"),
        (["--eval-queries", "0"], "argument --eval-queries"),
        (["--test-steps", "1,a"], "argument --test-steps"), (["--test-steps", "-1"], "argument --test-steps"),
        (["--eval-tasks", "0"], "argument --eval-tasks"), (["--clip-grad", "x"], "argument --clip-grad"),
        (["--lr-schedule", "step"], "argument --lr-schedule"), (["--val-every", "0"], "argument --val-every"),
        (["--val-tasks", "0"], "argument --val-tasks"), (["--log-every", "0"], "argument --log-every"),
        (["--checkpoint-every", "0"], "argument --checkpoint-every"), (["--hidden", "0"], "argument --hidden"),
        (["--image-size", "0"], "argument --image-size"), (["--split", "0.5,0.5"], "argument --split"),
        (["--split", "a,b,c"], "argument --split"), (["--nan-policy", "ignore"], "argument --nan-policy"),
        (["--imaml-lam", "0"], "argument --imaml-lam"), (["--imaml-lam", "x"], "argument --imaml-lam"),
        (["--cg-steps", "0"], "argument --cg-steps"), (["--cg-steps", "5.5"], "argument --cg-steps"),
        (["--dist-timeout", "0"], "argument --dist-timeout"), (["--dist-timeout", "x"], "argument --dist-timeout"),
        (["--algorithm", "maml3"], "argument --algorithm"), (["--foo"], "unrecognized arguments: --foo"),
        (["--inner-lr", "-1"], "inner_lr=-1.0"), (["--meta-lr", "0"], "meta_lr=0.0"),
        (["--meta-lr", "nan"], "meta_lr=nan"), (["--meta-lr", "inf"], "meta_lr=inf"),
        (["--clip-grad", "0"], "clip_grad=0.0"), (["--clip-grad", "-1"], "clip_grad=-1.0"),
        (["--device", "bogus"], "device='bogus' is not a torch device"),
        (["--device", "meta"], "device='meta' holds shapes only"),
        (["--device", "cuda:7"], "device='cuda:7'"),
        (["--split", "0.5,0.6,0.2"], "split=[0.5, 0.6, 0.2]"),
        (["--allow-config-change"], "--allow-config-change applies to --resume only"),
        (["--resume"], "--resume: no checkpoint.pt"),
    ]
] + [
    ("flag-no-preset", ["train"], "name a preset or task"),
    ("flag-image-size-3", ["train", "omniglot", "--data", "/nonexistent", "--image-size", "3"],
     "image_size=3 is too small"),
    ("flag-omniglot-missing-data", ["train", "omniglot", "--data", "/nonexistent/omni.zip"],
     "does not exist"),
    ("flag-folder-no-data", ["train", "folder"], "needs a data path"),
    ("eval-tasks-0", ["eval", "{run}", "--tasks", "0"], "argument --tasks"),
    ("eval-test-steps-x", ["eval", "{run}", "--test-steps", "x"], "argument --test-steps"),
    ("eval-seed--1", ["eval", "{run}", "--seed", "-1"], "argument --seed"),
    ("eval-algorithm-x", ["eval", "{run}", "--algorithm", "x"], "argument --algorithm"),
    ("eval-trace-0", ["eval", "{run}", "--trace", "0"], "argument --trace"),
]  # fmt: skip
if not torch.cuda.is_available():
    FLAG_CASES.append(("flag-device-cuda", [*_T, "--device", "cuda"], "sees no CUDA device"))
# Files, data, checkpoints, resume and runtime causes (prepared by the `env` fixture).
RUN_CASES = [
    ("config-missing", [*_T, "--config", "/nonexistent.toml"], "does not exist"),
    ("config-bad-toml", ["train", "--config", "{bad_toml}"], "is not valid"),
    ("config-yaml", ["train", "--config", "{yaml}"], "use a .toml or .json file"),
    ("config-list-json", ["train", "--config", "{list_json}"], "must hold a table"),
    ("output-under-a-file", [*_T, "--output", "{blocker}/x"], "not writable"),
    ("output-existing-run", [*_T, "--output", "{run}"], "already holds a training checkpoint"),
    ("omniglot-fake-zip", ["train", "omniglot", "--data", "{fake_zip}"], "not a zip archive"),
    ("folder-n-way-30", ["train", "folder", "--data", "{images}", "--n-way", "30"],
     "n_way=30 but the data has only"),
    ("omniglot-eval-shots", ["train", "omniglot", "--data", "{omni}", "--n-way", "3", "--queries",
                             "1", "--eval-shots", "3", "--eval-queries", "2"],
     "eval_shots + eval_queries = 3 + 2 = 5 images per class"),
    ("resume-changed", ["train", "--resume", "--output", "{run_copy}", "--inner-lr", "0.02",
                        "--k-shot", "3"], "shots (--k-shot): checkpoint 10, now 3; inner_lr: checkpoint 0.01, now 0.02"),
    ("resume-algorithm", [*_T, "--resume", "--output", "{run_copy}", "--algorithm", "metasgd"],
     "algorithm 'maml' but this run uses 'metasgd'"),
    ("resume-seed-allowed", ["train", "--resume", "--output", "{run_copy}", "--seed", "3",
                             "--allow-config-change"], "cannot change seed"),
    ("meta-lr-1e9", [*_T, "--meta-lr", "1e9", "--iterations", "30", "--meta-batch", "2",
                     "--output", "{tmp}/big"], "inner_lr is not the cause"),
    ("eval-missing", ["eval", "/nonexistent/checkpoint.pt"], "does not exist"),
    ("eval-output-run", ["eval", "{run}", "--output", "{run}"], "holds a training run"),
    ("eval-algorithm", ["eval", "{run}", "--algorithm", "metasgd"], "not 'metasgd'"),
    ("eval-truncated", ["eval", "{truncated}/checkpoint.pt"], "truncated or corrupt"),
    ("eval-flipped", ["eval", "{flipped}/checkpoint.pt"], "checksum does not match"),
    ("eval-planted", ["eval", "{planted}"], "not a plain weights file"),
    ("eval-foreign", ["eval", "{foreign}"], "not a metagrad training checkpoint"),
    ("eval-nan", ["eval", "{nan_run}"], "NaN/Inf parameters"),
    ("eval-trace-no-output", ["eval", "{run}", "--trace", "2", "--tasks", "2"], "needs --output"),
    ("eval-device-bogus", ["eval", "{run}", "--device", "bogus"], "device='bogus'"),
    ("eval-device-meta", ["eval", "{run}", "--device", "meta"], "device='meta'"),
    ("eval-shots-too-many", ["eval", "{omni_run}", "--shots", "4"],
     "metagrad eval: --shots/--queries"),
]  # fmt: skip
CLI_CASES = [
    *[(i, ["train", "--config", "{cfg}"], c, f) for i, c, f in TYPE_CASES + RANGE_CASES],
    ("preset-twice", [*_T, "--config", "{cfg}"], {"preset": "omniglot"}, "preset is named twice"),
    *[(i, a, None, f) for i, a, f in FLAG_CASES + RUN_CASES],
]
TRAINS = {"meta-lr-1e9"}  # the one case whose cause only shows while training


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs, files and data that the cases point at (built once)."""
    root = tmp_path_factory.mktemp("matrix")
    tiny = ["--iterations", "2", "--meta-batch", "2", "--eval-tasks", "2", "--no-progress",
            "--no-plots"]  # fmt: skip
    e = {"tmp": root, "run": root / "run", "omni": make_omniglot_zips(root / "omni")}
    assert main(["train", "sinusoid", "--output", str(e["run"]), *tiny]) == 0
    e["omni_run"] = root / "omni_run"
    assert main(["train", "omniglot", "--data", str(e["omni"]), "--n-way", "3", "--queries", "1",
                 "--eval-queries", "1", "--hidden", "4", "--image-size", "16", "--output",
                 str(e["omni_run"]), *tiny]) == 0  # fmt: skip
    e["images"] = make_image_folder(root / "images", classes=4, per_class=4, size=16)
    for name in ("truncated", "flipped", "nan_run"):
        e[name] = root / name
        shutil.copytree(e["run"], e[name])
    ck = e["truncated"] / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:4000])
    state = torch.load(e["run"] / "checkpoint.pt", weights_only=True)
    w = state["learner"]["module.0.weight"]
    raw = bytearray((e["flipped"] / "checkpoint.pt").read_bytes())
    at = raw.find(struct.pack(f"<{w.numel()}f", *w.flatten().tolist()))
    raw[at + 1] ^= 0x10
    (e["flipped"] / "checkpoint.pt").write_bytes(bytes(raw))
    state["learner"]["module.0.weight"] = torch.full_like(w, float("nan"))
    for f in ("checkpoint.pt", "checkpoint.prev.pt"):
        (e["nan_run"] / f).unlink(missing_ok=True)
    state.pop("checksum", None)
    state.pop("format", None)
    save_checkpoint(state, e["nan_run"])
    e["planted"] = root / "planted.pt"
    torch.save({"format": "metagrad-checkpoint/1", "x": __import__("argparse").Namespace()},
               e["planted"])  # fmt: skip
    e["foreign"] = root / "foreign.pt"
    torch.save({"state": torch.ones(2)}, e["foreign"])
    e["bad_toml"] = root / "bad.toml"
    e["bad_toml"].write_text("x = [")
    e["yaml"] = root / "c.yaml"
    e["yaml"].write_text("a: 1")
    e["list_json"] = root / "list.json"
    e["list_json"].write_text("[1, 2]")
    e["blocker"] = root / "blocker"
    e["blocker"].write_text("")
    e["fake_zip"] = root / "fake.zip"
    e["fake_zip"].write_bytes(b"nope")
    return e


@pytest.mark.parametrize(("case", "argv", "config", "fragment"), CLI_CASES,
                         ids=[c[0] for c in CLI_CASES])  # fmt: skip
def test_cli_bad_input_matrix(
    case: str, argv: list[str], config: dict[str, Any] | None, fragment: str,
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from metagrad.training._trainer import Trainer

    if case not in TRAINS:  # a bad input that slipped through must fail here, not train

        def no_training(self: Any, until: int | None = None) -> int:
            raise AssertionError(f"{case}: accepted, training started")

        monkeypatch.setattr(Trainer, "train", no_training)
    cfg = tmp_path / "c.json"
    if config is not None:
        cfg.write_text(json.dumps({"preset": "sinusoid", **config}))
    paths = {**{k: str(v) for k, v in env.items()}, "cfg": str(cfg)}
    if "{run_copy}" in " ".join(argv):
        shutil.copytree(env["run"], tmp_path / "run_copy")
        paths["run_copy"] = str(tmp_path / "run_copy")
    args = [a.format(**paths) for a in argv]
    if args[0] == "train" and "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith(f"metagrad {args[0]}: error: "), err
    assert fragment in lines[-1], err
    assert "Traceback" not in err and "weights_only set to False" not in err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # refused before any training


def test_matrix_size() -> None:
    """README quotes these counts; at least 150 bad-input kinds, each rejected clearly."""
    assert len(TYPE_CASES) >= 80 and len(CLI_CASES) >= 150


def test_fully_skipped_log_window_logs_blanks_not_zero_division(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # meta_lr 1e9: iteration 1 updates, 2..8 are skipped (the parameters overflow), fewer than
    # the 10-in-a-row limit; the log window 6..8 has no finite loss.
    argv = ["train", "sinusoid", "--meta-lr", "1e9", "--nan-policy", "skip", "--iterations", "8",
            "--log-every", "5", "--meta-batch", "2", "--eval-tasks", "2", "--no-progress",
            "--no-plots", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ZeroDivisionError" not in err and err.count("metagrad train: warning: skipped") == 7
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[-1].startswith("8,,")  # iteration 8, blank train_loss
