"""The docstring examples of metagrad.workloads run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["_hpo", "_reweight", "_distill"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"metagrad.workloads.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
