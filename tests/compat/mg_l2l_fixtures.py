"""Tiny Omniglot-shaped zips for the learn2learn data tests (built with Pillow, in tmp_path).

Two zips share the alphabet Greek with identical images, like the real background-small zips.
Enough characters that learn2learn's 1100/100/423 split, scaled, leaves 5 validation classes.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUT = {
    "images_background_small1": ["Alpha_Script", "Greek"],
    "images_background_small2": ["Greek", "Beta_Script"],
}
CHARACTERS = 30
DRAWERS = 3


def stroke_png(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG: white background, one random black rectangle (distinct per seed)."""
    rng = np.random.default_rng(seed)
    img = np.ones((size, size), dtype=bool)
    r0, c0 = rng.integers(5, size - 40, size=2)
    h, w = rng.integers(10, 35, size=2)
    img[r0 : r0 + h, c0 : c0 + w] = False
    buf = io.BytesIO()
    Image.fromarray(img).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_zips(folder: Path, characters: int = CHARACTERS, drawers: int = DRAWERS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, alphabets in LAYOUT.items():
        with zipfile.ZipFile(folder / f"{stem}.zip", "w") as zf:
            for alphabet in alphabets:
                for c in range(1, characters + 1):
                    for d in range(1, drawers + 1):
                        seed = sum(map(ord, alphabet)) * 10_000 + c * 100 + d
                        name = f"{stem}/{alphabet}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png"
                        zf.writestr(name, stroke_png(seed))
    return folder


def distinct_characters(characters: int = CHARACTERS) -> int:
    return len({a for v in LAYOUT.values() for a in v}) * characters
