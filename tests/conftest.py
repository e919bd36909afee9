"""Shared pytest setup: every test starts from the same random state."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed torch, random and numpy so each test is reproducible in isolation."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str], list[int]]:
    """``count_calls(owner, "name")`` wraps ``owner.name`` (undone after the test) and returns
    the list that gets one entry per call, so a test can tell which code path ran."""

    def install(owner: object, name: str) -> list[int]:
        calls: list[int] = []
        real = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return install
