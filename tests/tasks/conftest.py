"""Fixtures of tiny image data sets (Omniglot-shaped zips, class folders) built with Pillow."""

from __future__ import annotations

from pathlib import Path

import pytest
from mg_image_fixtures import make_image_folder, make_omniglot_zips


@pytest.fixture
def omniglot_zips(tmp_path: Path) -> Path:
    """A folder with two Omniglot-shaped zips sharing the alphabet ``Greek`` (identical images)."""
    return make_omniglot_zips(tmp_path / "omniglot")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``root/<class>/*.png``: 6 classes of 5 RGB 12x12 images."""
    return make_image_folder(tmp_path / "images")
