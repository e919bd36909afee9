"""Builders of tiny on-disk image data sets (shared by tests/tasks and tests/training)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# zip name -> alphabets; "Greek" is in both, with identical images, like the real data.
OMNIGLOT_LAYOUT = {
    "images_background_small1": ["Alpha_Script", "Greek"],
    "images_background_small2": ["Greek", "Beta_Script", "Gamma_Script"],
}
CHARACTERS = 4
DRAWERS = 4


def stroke_png(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG, white background with a random black blob (distinct per seed)."""
    rng = np.random.default_rng(seed)
    img = np.ones((size, size), dtype=bool)
    r0, c0 = rng.integers(10, size - 30, size=2)
    h, w = rng.integers(8, 25, size=2)
    img[r0 : r0 + h, c0 : c0 + w] = False
    img[rng.random((size, size)) < 0.01] = False
    buf = io.BytesIO()
    Image.fromarray(img).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _seed(alphabet: str, char: int, drawer: int) -> int:
    return (sum(map(ord, alphabet)) * 1000 + char * 100 + drawer) % (2**31)


def omniglot_members(zip_stem: str) -> dict[str, bytes]:
    out = {}
    for alphabet in OMNIGLOT_LAYOUT[zip_stem]:
        for c in range(1, CHARACTERS + 1):
            for d in range(1, DRAWERS + 1):
                name = f"{zip_stem}/{alphabet}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png"
                out[name] = stroke_png(_seed(alphabet, c, d))
    return out


def make_omniglot_zips(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in OMNIGLOT_LAYOUT:
        with zipfile.ZipFile(folder / f"{stem}.zip", "w") as zf:
            for name, data in omniglot_members(stem).items():
                zf.writestr(name, data)
    return folder


def distinct_characters() -> int:
    alphabets = {a for v in OMNIGLOT_LAYOUT.values() for a in v}
    return len(alphabets) * CHARACTERS


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
