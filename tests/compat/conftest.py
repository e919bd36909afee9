"""Fixtures of the compat tests: tiny Omniglot-shaped zips (see mg_l2l_fixtures)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from mg_l2l_fixtures import make_zips  # noqa: E402


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two Omniglot-shaped zips (90 distinct characters, 3 drawers each)."""
    return make_zips(tmp_path_factory.mktemp("omniglot"))
