"""Builders of tiny on-disk image data sets (shared by tests/tasks and tests/training)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# zip name -> alphabets; "Greek" is in both, with identical images, like the real data.
OMNIGLOT_LAYOUT = {
    "images_background_small1": ["Alpha_Script", "Greek"],
    "images_background_small2": ["Greek", "Beta_Script", "Gamma_Script"],
}
CHARACTERS = 4
DRAWERS = 4


def stroke_png(
    seed: int,
    size: int = 105,
    corner: tuple[int, int] = (10, 30),
    sides: tuple[int, int] = (8, 25),
    speckle: float = 0.01,
) -> bytes:
    """A 1-bit PNG, white background with a random black blob (distinct per seed).

    The blob: a rectangle with its corner in ``[corner[0], size - corner[1])`` and its sides in
    ``[sides[0], sides[1])``, plus a fraction ``speckle`` of random black pixels.
    """
    rng = np.random.default_rng(seed)
    img = np.ones((size, size), dtype=bool)
    r0, c0 = rng.integers(corner[0], size - corner[1], size=2)
    h, w = rng.integers(sides[0], sides[1], size=2)
    img[r0 : r0 + h, c0 : c0 + w] = False
    if speckle:
        img[rng.random((size, size)) < speckle] = False
    buf = io.BytesIO()
    Image.fromarray(img).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _seed(alphabet: str, char: int, drawer: int) -> int:
    return (sum(map(ord, alphabet)) * 1000 + char * 100 + drawer) % (2**31)


def omniglot_members(
    zip_stem: str,
    layout: dict[str, list[str]] = OMNIGLOT_LAYOUT,
    characters: int = CHARACTERS,
    drawers: int = DRAWERS,
    seed: Callable[[str, int, int], int] = _seed,
    png: Callable[[int], bytes] = stroke_png,
) -> dict[str, bytes]:
    """Member name -> PNG of one Omniglot-shaped zip: ``png(seed(alphabet, char, drawer))``."""
    out = {}
    for alphabet in layout[zip_stem]:
        for c in range(1, characters + 1):
            for d in range(1, drawers + 1):
                name = f"{zip_stem}/{alphabet}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png"
                out[name] = png(seed(alphabet, c, d))
    return out


def make_omniglot_zips(
    folder: Path, layout: dict[str, list[str]] = OMNIGLOT_LAYOUT, **members: Any
) -> Path:
    """One ``<zip stem>.zip`` per key of ``layout`` in ``folder``; ``members``: the other
    arguments of :func:`omniglot_members`."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in layout:
        with zipfile.ZipFile(folder / f"{stem}.zip", "w") as zf:
            for name, data in omniglot_members(stem, layout, **members).items():
                zf.writestr(name, data)
    return folder


def distinct_characters(
    layout: dict[str, list[str]] = OMNIGLOT_LAYOUT, characters: int = CHARACTERS
) -> int:
    alphabets = {a for v in layout.values() for a in v}
    return len(alphabets) * characters


def make_image_folder(
    root: Path, classes: int = 6, per_class: int = 5, size: int = 12, mode: str = "RGB"
) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(arr, mode=mode).save(d / f"img_{i}.png")
    return root
