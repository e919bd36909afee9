"""Presets, config files and their precedence, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metagrad.training import PRESETS, ConfigError, TrainConfig, preset, read_config_file
from metagrad.training._config import apply_overrides, validate


def test_sinusoid_preset_is_the_maml_paper() -> None:
    c = preset("sinusoid")
    assert (c.task, c.shots, c.inner_steps, c.inner_lr) == ("sinusoid", 10, 1, 0.01)
    assert (c.meta_lr, c.meta_batch, c.iterations, c.eval_shots) == (1e-3, 25, 70_000, 5)
    assert c.test_steps == [0, 1, 5, 10]
    assert preset("sinusoid-quick") == c.replace(iterations=10_000)


def test_omniglot_presets() -> None:
    c = preset("omniglot")
    assert c == preset("omniglot-5w1s")
    assert (c.n_way, c.shots, c.hidden, c.inner_steps, c.eval_steps) == (5, 1, 64, 1, 3)
    assert (c.inner_lr, c.meta_batch, c.rotations) == (0.4, 32, [0, 90, 180, 270])
    assert preset("omniglot-20w1s").n_way == 20
    for name in PRESETS:
        validate(preset(name).replace(data="x"))


def test_unknown_preset_and_setting() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'sinus'.*sinusoid"):
        preset("sinus")
    with pytest.raises(ConfigError, match="unknown setting 'inner_rate'"):
        apply_overrides(TrainConfig(), {"inner_rate": 1}, "test")


def test_toml_and_json_files(tmp_path: Path) -> None:
    t = tmp_path / "run.toml"
    t.write_text('preset = "sinusoid"\n[train]\ninner-lr = 0.05\nmeta_batch = 4\n')
    assert read_config_file(t) == {"preset": "sinusoid", "inner-lr": 0.05, "meta_batch": 4}
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"algorithm": "metasgd"}))
    cfg = apply_overrides(preset("sinusoid"), read_config_file(j), "j")
    assert cfg.algorithm == "metasgd"
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    with pytest.raises(ConfigError, match="not valid"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r".toml or .json"):
        read_config_file(tmp_path.joinpath("a.yaml").write_text("a: 1") and tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"meta_batch": 0}, "meta_batch=0 must be an int >= 1"),
        ({"shots": -2}, "shots=-2"),
        ({"iterations": 0}, "iterations=0"),
        ({"algorithm": "maml2"}, "algorithm='maml2' is not known"),
        ({"task": "cifar"}, "task='cifar'"),
        ({"meta_lr": 0.0}, "meta_lr=0.0"),
        ({"inner_lr": float("nan")}, "inner_lr=nan"),
        ({"test_steps": []}, "test_steps"),
        ({"image_size": 0}, "image_size=0"),
        ({"task": "folder"}, "needs a data path"),
    ],
)
def test_validation_names_the_field(change: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(TrainConfig().replace(**change))
