"""Atomic checkpoints, weights-only loading, RNG state round trips."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from metagrad.training import CheckpointError, load_checkpoint, save_checkpoint
from metagrad.training._checkpoint import PREVIOUS, rng_state, set_rng_state


def test_save_keeps_previous_and_loads_weights_only(tmp_path: Path) -> None:
    save_checkpoint({"iteration": 1, "w": torch.ones(2), "rng": rng_state()}, tmp_path)
    save_checkpoint({"iteration": 2, "w": torch.zeros(2)}, tmp_path)
    assert load_checkpoint(tmp_path)["iteration"] == 2
    assert load_checkpoint(tmp_path / PREVIOUS)["iteration"] == 1
    # plain torch.load with weights_only=True works (RNG states are tensors/lists)
    state = torch.load(tmp_path / PREVIOUS, weights_only=True)
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert not list(tmp_path.glob(".*tmp*"))


def test_truncated_latest_falls_back_to_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_checkpoint({"iteration": 1}, tmp_path)
    save_checkpoint({"iteration": 2}, tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert load_checkpoint(tmp_path)["iteration"] == 1
    err = caplog.text  # the warning goes through the "metagrad" logger (the CLI prints it)
    assert "checkpoint.pt" in err and "last good checkpoint" in err and "checkpoint.prev.pt" in err


def test_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"state": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a metagrad training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)


def test_rng_round_trip() -> None:
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
