"""The small vision transformer of the model zoo and ``metagrad train ... --model vit``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mg_image_fixtures import make_omniglot_zips

import metagrad as mg
from metagrad.models import ViT, vit
from metagrad.training import preset
from metagrad.training._build import make_model
from metagrad.training._cli import add_train_parser
from metagrad.training._config import ConfigError, validate


def test_vit_shapes_and_defaults() -> None:
    model = vit()
    assert sum(p.numel() for p in model.parameters()) == 105_093
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    assert vit(n_way=20, in_channels=3, image_size=84)(torch.randn(2, 3, 84, 84)).shape == (2, 20)
    with pytest.raises(ValueError, match="multiple of patch"):
        vit(image_size=30)


def test_vit_second_order_check_passes() -> None:
    torch.manual_seed(0)
    model = vit(n_way=3, image_size=8, patch=4, dim=8, depth=2, heads=2)
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.4, inner_steps=1)
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(2, 3, 1, 8, 8, generator=g), torch.randn(2, 6, 1, 8, 8, generator=g)
    ys, yq = torch.arange(3).repeat(2, 1), torch.arange(3).repeat(2, 2)
    report = mg.check_meta_gradient(learner, xs, ys, xq, yq, directions=2)
    assert report.passed and report.strategy == "loop", str(report)  # LayerNorm: the loop


def test_config_model_choice() -> None:
    cfg = preset("omniglot").replace(model="vit")
    model = make_model(validate(cfg), (1, 28, 28))
    assert isinstance(model, ViT) and model.embed.kernel_size == (7, 7)
    assert isinstance(make_model(cfg, (1, 16, 16)), ViT)  # 4x4 patches
    with pytest.raises(ConfigError, match="model='resnet' is not known"):
        validate(cfg.replace(model="resnet"))
    with pytest.raises(ConfigError, match="7x7, 4x4 or 2x2 patches"):
        make_model(cfg, (1, 17, 17))
    assert "model" not in preset("omniglot").to_dict() or preset("omniglot").model == "conv4"


def test_train_vit_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_omniglot_zips(tmp_path / "omniglot")
    parser = argparse.ArgumentParser(prog="metagrad")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    out = tmp_path / "run"
    argv = ["train", "omniglot", "--model", "vit", "--data", str(data), "--output", str(out),
            "--image-size", "16", "--n-way", "3", "--queries", "1", "--eval-queries", "1",
            "--iterations", "2", "--meta-batch", "2", "--eval-tasks", "3", "--val-every", "2", "--val-tasks", "2",
            "--log-every", "1", "--test-steps", "0,1", "--no-progress", "--no-plots"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    assert "query accuracy" in capsys.readouterr().out
    learner = mg.load(out)  # the model is rebuilt from the checkpoint's config
    assert isinstance(learner.module, ViT)
