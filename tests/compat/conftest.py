"""Fixtures of the compat tests: tiny Omniglot-shaped zips (see mg_l2l_fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mg_l2l_fixtures import make_zips


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two Omniglot-shaped zips (90 distinct characters, 3 drawers each)."""
    return make_zips(tmp_path_factory.mktemp("omniglot"))
