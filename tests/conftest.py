"""Shared pytest setup: every test starts from the same random state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed torch, random and numpy so each test is reproducible in isolation."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
