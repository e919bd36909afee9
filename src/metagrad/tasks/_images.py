"""Decoded image classes held in one uint8 tensor, and the folder-per-class reader.

Everything is decoded once into ``images [M, C, H, W]`` (uint8) with a class index per image;
samplers only gather indices, so drawing a meta-batch costs one ``index_select``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """Data on disk that cannot be used as asked (missing, wrong layout, corrupt, too small)."""


def decode_image(
    data: bytes,
    where: str,
    *,
    size: tuple[int, int] | None,
    channels: int | None,
    invert: bool = False,
) -> np.ndarray:
    """Decode one encoded image to ``uint8 [C, H, W]``.

    Args:
        data: the file's bytes (PNG or JPEG).
        where: how to name the file in an error (path or ``zip:member``).
        size: ``(H, W)`` to resize to with LANCZOS, or None to keep the size.
        channels: 1 (grayscale) or 3 (RGB); None: 1 for grayscale/bilevel files, else 3.
        invert: ``255 - value`` (Omniglot: white background, strokes become 1 after scaling).

    Raises:
        DatasetError: the bytes are not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if channels is None:
                channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and (img.height, img.width) != tuple(size):
                img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"cannot decode image {where} ({type(err).__name__}: {err}); the file is corrupt or "
            f"not an image. Fix: delete or re-download it."
        ) from None
    if invert:
        arr = 255 - arr
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


@dataclass
class ImageClasses:
    """A labelled image set: ``images`` uint8 ``[M, C, H, W]``, ``targets`` long ``[M]``.

    Attributes:
        images: every decoded image.
        targets: class index of each image, in ``range(len(names))``.
        names: class names (e.g. ``"Greek/character03"`` or a folder name).
    """

    images: Tensor
    targets: Tensor
    names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "metagrad.tasks.ImageClasses: images must be a uint8 tensor [M, C, H, W], got "
                f"{self.images.dtype} {tuple(self.images.shape)}."
            )
        if self.targets.shape != (self.images.shape[0],):
            raise ValueError(
                "metagrad.tasks.ImageClasses: targets must hold one class index per image."
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_sizes(self) -> Tensor:
        """Images per class, ``[num_classes]``."""
        return torch.bincount(self.targets, minlength=self.num_classes)

    def subset(self, classes: Sequence[int]) -> ImageClasses:
        """Only the given classes (re-indexed ``0..len(classes)-1`` in that order)."""
        idx_map = torch.full((self.num_classes,), -1, dtype=torch.long)
        idx_map[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
        new_t = idx_map[self.targets]
        keep = new_t >= 0
        return ImageClasses(self.images[keep], new_t[keep], [self.names[c] for c in classes])

    def with_rotations(self, angles: Iterable[int]) -> ImageClasses:
        """Each class rotated by each angle (multiples of 90) becomes its own class.

        As the MAML reference's Omniglot setup: ``(0, 90, 180, 270)`` quadruples the classes.
        """
        angles = [int(a) for a in angles]
        bad = [a for a in angles if a % 90 != 0]
        if not angles or bad or len(set(a % 360 for a in angles)) != len(angles):
            raise ValueError(
                f"metagrad.tasks.ImageClasses.with_rotations: angles={angles} must be distinct "
                f"multiples of 90 (e.g. (0, 90, 180, 270))."
            )
        if angles == [0]:
            return self
        imgs, tgts, names = [], [], []
        for r, a in enumerate(angles):
            imgs.append(torch.rot90(self.images, k=(a // 90) % 4, dims=(2, 3)))
            tgts.append(self.targets + r * self.num_classes)
            names += [n if a % 360 == 0 else f"{n}@rot{a % 360}" for n in self.names]
        return ImageClasses(torch.cat(imgs), torch.cat(tgts), names)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    invert: bool = False,
) -> ImageClasses:
    """Read a folder-per-class dataset (mini-ImageNet layout ``root/<class>/*.png|jpg``).

    Args:
        root: the folder holding one sub-folder per class.
        image_size: resize every image to this (LANCZOS); None keeps the files' size (which
            must then be the same for all).
        channels: 1 or 3; None infers from the first image.
        invert: store ``255 - value``.

    Raises:
        DatasetError: missing folder, no class folders, an empty class, a corrupt image or
            images of different sizes with ``image_size=None``.
    """
    fn = "metagrad.tasks.load_image_folder"
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{fn}: data folder {str(root)!r} does not exist or is not a folder. Fix: pass the "
            f"folder that holds one sub-folder of images per class (root/<class>/*.png)."
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in class_dirs if _image_files(d)]
    if len(class_dirs) < 2:
        raise DatasetError(
            f"{fn}: {str(root)!r} holds {len(class_dirs)} class folder(s) with images; expected "
            f"the layout root/<class>/*.png|jpg with at least 2 classes."
        )
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise ValueError(f"{fn}: image_size={image_size!r} must be a positive int or (H, W).")
    arrays: list[np.ndarray] = []
    targets: list[int] = []
    for c, d in enumerate(class_dirs):
        for f in _image_files(d):
            arr = decode_image(f.read_bytes(), str(f), size=size, channels=channels, invert=invert)
            if channels is None:
                channels = arr.shape[0]
            if arrays and arr.shape != arrays[0].shape:
                raise DatasetError(
                    f"{fn}: image {str(f)!r} has shape {arr.shape} but earlier images have "
                    f"{arrays[0].shape}. Fix: pass image_size (e.g. --image-size 84) to resize all."
                )
            arrays.append(arr)
            targets.append(c)
    return ImageClasses(
        torch.from_numpy(np.stack(arrays)),
        torch.tensor(targets, dtype=torch.long),
        [d.name for d in class_dirs],
    )
