"""Shared fixtures: tiny configs and on-disk image data (builders live in tests/tasks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TASKS = str(Path(__file__).resolve().parents[1] / "tasks")
if _TASKS not in sys.path:
    sys.path.insert(0, _TASKS)

from mg_image_fixtures import make_image_folder, make_omniglot_zips  # noqa: E402

from metagrad.training import TrainConfig, preset  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_sinusoid() -> TrainConfig:
    """The sinusoid preset cut to a few cheap iterations."""
    return preset("sinusoid").replace(
        iterations=6, meta_batch=3, val_every=3, val_tasks=4, eval_tasks=5, log_every=2,
        checkpoint_every=2, test_steps=[0, 1, 2],
    )  # fmt: skip


@pytest.fixture
def omniglot_zips(tmp_path: Path) -> Path:
    return make_omniglot_zips(tmp_path / "omniglot")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", classes=8, per_class=5, size=16)
