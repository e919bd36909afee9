"""Tiny Omniglot-shaped zips for the learn2learn data tests (built with Pillow, in tmp_path).

Two zips share the alphabet Greek with identical images, like the real background-small zips.
Enough characters that learn2learn's 1100/100/423 split, scaled, leaves 5 validation classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mg_image_fixtures import distinct_characters as _distinct_characters
from mg_image_fixtures import make_omniglot_zips
from mg_image_fixtures import stroke_png as _stroke_png
from torch import nn

LAYOUT = {
    "images_background_small1": ["Alpha_Script", "Greek"],
    "images_background_small2": ["Greek", "Beta_Script"],
}
CHARACTERS = 30
DRAWERS = 3


def stroke_png(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG: white background, one random black rectangle (distinct per seed)."""
    return _stroke_png(seed, size, corner=(5, 40), sides=(10, 35), speckle=0.0)


def _seed(alphabet: str, char: int, drawer: int) -> int:
    return sum(map(ord, alphabet)) * 10_000 + char * 100 + drawer


def make_zips(folder: Path, characters: int = CHARACTERS, drawers: int = DRAWERS) -> Path:
    return make_omniglot_zips(
        folder, LAYOUT, characters=characters, drawers=drawers, seed=_seed, png=stroke_png
    )


def distinct_characters(characters: int = CHARACTERS) -> int:
    return _distinct_characters(LAYOUT, characters)


class SineModel(nn.Module):
    """learn2learn's ``examples/maml_sine.py`` model, as written there: MLP 1-dim-dim-1, ReLU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hidden1 = nn.Linear(1, dim)
        self.hidden2 = nn.Linear(dim, dim)
        self.hidden3 = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.hidden1(x))
        x = nn.functional.relu(self.hidden2(x))
        return self.hidden3(x)
