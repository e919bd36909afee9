"""Shared fixtures: tiny configs and on-disk image data (builders live in tests/tasks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mg_image_fixtures import make_image_folder, make_omniglot_zips

from metagrad.training import TrainConfig, preset


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The training tests run on one thread (small tensors; less contention), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
