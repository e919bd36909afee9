"""Omniglot read in place from the official zips (or extracted folders), split by character.

The two "background small" zips both contain the alphabets Greek and Latin with identical
images. Characters are therefore de-duplicated by ``(alphabet, character)`` *before* the split,
otherwise test characters leak into training.

Reference: Lake, Salakhutdinov, Tenenbaum, *Human-level concept learning through probabilistic
program induction*, Science 2015. Rotations as new classes follow the MAML reference code.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
import torch

from metagrad.tasks._images import DatasetError, ImageClasses, decode_image

FN = "metagrad.tasks.load_omniglot"
LAYOUT = "<Alphabet>/<characterNN>/<id>_<drawer>.png"

Key = tuple[str, str]


@dataclass
class OmniglotSplits:
    """Train / validation / test :class:`ImageClasses`, split by character.

    Attributes:
        train, val, test: the splits (rotated copies are classes of the same split).
        characters: ``{"train": [(alphabet, character), ...], ...}`` before rotation.
        duplicates: ``(alphabet, character)`` pairs met more than once and kept once.
    """

    train: ImageClasses
    val: ImageClasses
    test: ImageClasses
    characters: dict[str, list[Key]] = field(default_factory=dict)
    duplicates: list[Key] = field(default_factory=list)

    def split(self, name: str) -> ImageClasses:
        if name not in ("train", "val", "test"):
            raise ValueError(f"{FN}: unknown split {name!r}; use 'train', 'val' or 'test'.")
        data: ImageClasses = getattr(self, name)
        return data


def _sources(path: Path) -> list[Path]:
    if not path.exists():
        raise DatasetError(
            f"{FN}: Omniglot data path {str(path)!r} does not exist. Fix: pass --data pointing to "
            f"images_background_small1.zip, a folder holding the Omniglot zip files, or an "
            f"extracted folder laid out as {LAYOUT}."
        )
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DatasetError(
                f"{FN}: {str(path)!r} is a file but not a zip archive. Fix: pass an Omniglot zip "
                f"(e.g. images_background_small1.zip) or a folder."
            )
        return [path]
    zips = sorted(p for p in path.iterdir() if p.suffix.lower() == ".zip" and p.is_file())
    return zips or [path]


def _zip_members(path: Path) -> Iterator[tuple[Key, str, bytes]]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise DatasetError(f"{FN}: {str(path)!r} is not a readable zip ({err}).") from None
    with archive:
        found = False
        names = archive.namelist()
        for name in sorted(names):
            parts = PurePosixPath(name).parts
            if name.endswith("/") or len(parts) < 3 or not name.lower().endswith(".png"):
                continue
            if ".." in parts or name.startswith("/"):
                continue  # path-traversal names are never Omniglot images; never used as paths
            found = True
            # Read in memory: nothing is ever extracted to a path taken from the archive.
            yield (parts[-3], parts[-2]), f"{path}:{name}", archive.read(name)
        if not found:
            raise DatasetError(
                f"{FN}: zip {str(path)!r} is not Omniglot-shaped: no member matches {LAYOUT} "
                f"(first members: {names[:3]}). Fix: pass images_background_small1.zip / "
                f"images_background_small2.zip or an extracted Omniglot folder."
            )


def _folder_members(root: Path) -> Iterator[tuple[Key, str, bytes]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    files = [p for p in files if len(p.relative_to(root).parts) >= 3]
    if not files:
        raise DatasetError(
            f"{FN}: folder {str(root)!r} holds no Omniglot zip and no PNG laid out as {LAYOUT}. "
            f"Fix: pass the folder with the Omniglot zips, a zip, or an extracted alphabet folder."
        )
    for p in files:
        yield (p.parent.parent.name, p.parent.name), str(p), p.read_bytes()


def read_omniglot_files(
    path: str | os.PathLike[str],
) -> tuple[dict[Key, list[tuple[str, bytes]]], list[Key]]:
    """Encoded PNGs per ``(alphabet, character)``, de-duplicated across sources.

    Returns:
        ``(characters, duplicates)``: a character met again in a later source (e.g. Greek in
        both background-small zips) keeps its first copy and is listed in ``duplicates``.
    """
    chars: dict[Key, list[tuple[str, bytes]]] = {}
    duplicates: list[Key] = []
    for src in _sources(Path(path)):
        seen_here: dict[Key, list[tuple[str, bytes]]] = {}
        members = _folder_members(src) if src.is_dir() else _zip_members(src)
        for key, where, data in members:
            seen_here.setdefault(key, []).append((where, data))
        for key, files in seen_here.items():
            if key in chars:
                duplicates.append(key)
            else:
                chars[key] = files
    return chars, duplicates


def split_characters(
    keys: Sequence[Key], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[Key]]:
    """Shuffle the sorted distinct characters with ``seed`` and cut train/val/test."""
    if len(fractions) != 3 or min(fractions) < 0 or not 0.99 < sum(fractions) < 1.01:
        raise ValueError(
            f"{FN}: split={tuple(fractions)} must be three fractions >= 0 summing to 1 "
            f"(e.g. (0.7, 0.1, 0.2))."
        )
    ordered = sorted(set(keys))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_train = round(fractions[0] * len(ordered))
    n_val = round(fractions[1] * len(ordered))
    shuffled = [ordered[i] for i in perm]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


T = TypeVar("T")


def keep_fraction(items: Sequence[T], fraction: float, seed: int) -> list[T]:
    """A nested subset of ``items``: the first ``round(fraction * n)`` of a ``seed``-shuffled order.

    Nested: for the same ``items`` and ``seed`` a smaller fraction keeps a subset of what a larger
    one keeps, so a data-scaling curve adds data rather than swapping it. Returned sorted.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or one that keeps no item.
    """
    if isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"metagrad.tasks.keep_fraction: fraction={fraction!r} must be in (0, 1], e.g. 0.5."
        )
    if fraction == 1.0:
        return list(items)
    keep = round(fraction * len(items))
    if keep < 1:
        raise ValueError(
            f"metagrad.tasks.keep_fraction: fraction={fraction!r} of {len(items)} items keeps "
            f"none. Fix: use a fraction >= {1.0 / max(len(items), 1):.3g}."
        )
    # A stream of its own (seed + 1): the split's permutation uses ``seed`` itself.
    order = np.random.default_rng(seed + 1).permutation(len(items))[:keep]
    return [items[i] for i in sorted(int(i) for i in order)]


def load_omniglot(
    path: str | os.PathLike[str],
    *,
    image_size: int = 28,
    split: tuple[float, float, float] = (0.7, 0.1, 0.2),
    split_seed: int = 0,
    rotations: Sequence[int] = (0, 90, 180, 270),
    train_fraction: float = 1.0,
) -> OmniglotSplits:
    """Load Omniglot, split by character, add rotated copies as new classes.

    Args:
        path: an Omniglot zip, a folder of zips, or an extracted folder ({layout}).
        image_size: side length after LANCZOS resizing (28 in the MAML paper).
        split: train / val / test fractions of the distinct characters.
        split_seed: seed of the split (fixed, independent of the training seed).
        rotations: angles whose rotated copies become classes of their own (``(0,)``: none).
        train_fraction: keep this fraction of the training characters (all their rotations),
            a nested subset (:func:`keep_fraction`); validation and test are unchanged.

    Raises:
        DatasetError: missing path, a zip that is not Omniglot-shaped, a corrupt PNG, a split
            with no character.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"{FN}: image_size={image_size!r} must be an int > 0 (e.g. 28).")
    chars, duplicates = read_omniglot_files(path)
    parts = split_characters(list(chars), split, split_seed)
    parts["train"] = keep_fraction(parts["train"], train_fraction, split_seed)
    for name, keys in parts.items():
        if not keys:
            raise DatasetError(
                f"{FN}: the {name} split has no character ({len(chars)} distinct characters, "
                f"split={split}). Fix: give each split a larger fraction or use more data."
            )
    size = (image_size, image_size)
    out: dict[str, ImageClasses] = {}
    for name, keys in parts.items():
        arrays, targets = [], []
        for c, key in enumerate(keys):
            for where, data in chars[key]:
                arrays.append(decode_image(data, where, size=size, channels=1, invert=True))
                targets.append(c)
        base = ImageClasses(
            torch.from_numpy(np.stack(arrays)),
            torch.tensor(targets, dtype=torch.long),
            [f"{a}/{ch}" for a, ch in keys],
        )
        out[name] = base.with_rotations(rotations)
    return OmniglotSplits(out["train"], out["val"], out["test"], parts, sorted(set(duplicates)))


if load_omniglot.__doc__:
    load_omniglot.__doc__ = load_omniglot.__doc__.replace("{layout}", LAYOUT)
