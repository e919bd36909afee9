r"""learn2learn's vision data: ``FullOmniglot``, ``RandomClassRotation`` and ``get_tasksets``.

Everything is read from local files (metagrad never downloads): the Omniglot zips or their
extracted folders, through metagrad's own reader :func:`metagrad.tasks.read_omniglot_files`,
which de-duplicates characters by ``(alphabet, character)``.

Split conventions (both split by *character*, never by drawer):

* ``split="learn2learn"`` (default), learn2learn's Omniglot benchmark: the class indices are
  shuffled with Python's global ``random`` (seeded by your script's ``random.seed``) and cut
  into 1100 train / 100 validation / 423 test classes of the 1623 of the full Omniglot
  (background + evaluation). With fewer classes (e.g. the two background-small zips: 242
  distinct characters) the same fractions are used: 164 / 15 / 63.
* ``split="metagrad"``, the split of ``metagrad train omniglot`` (:func:`metagrad.tasks.
  load_omniglot`): the sorted distinct characters are permuted with ``split_seed`` (default 0)
  and cut 70% / 10% / 20%, so the split does not depend on the global random state.

In both, rotations are learn2learn's: each class of a task is rotated by a random multiple of
90 degrees (data augmentation), whereas ``metagrad train`` makes each rotation a class of its
own (the MAML paper's setup).
"""

from __future__ import annotations

import io
import math
import os
import random
from collections import namedtuple
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from metagrad.compat._l2l_data import MetaDataset, TaskDataset
from metagrad.compat._l2l_transforms import (
    ConsecutiveLabels,
    FusedNWaysKShots,
    LoadData,
    RemapLabels,
    TaskTransform,
)
from metagrad.tasks import DatasetError, decode_image, read_omniglot_files
from metagrad.tasks._omniglot import split_characters

Key = tuple[str, str]
L2L_COUNTS = (1100, 100, 423)  # learn2learn's Omniglot benchmark, of 1623 classes

_WHERE = (
    "metagrad never downloads. Put Omniglot's images_background.zip and images_evaluation.zip "
    "(the full set, from the dataset authors' repository brendenlake/omniglot, python/ folder), "
    "or images_background_small1.zip / images_background_small2.zip, in {root} or "
    "{root}/omniglot-py/ (torchvision's layout), zipped or extracted "
    "(<Alphabet>/<characterNN>/<id>_<drawer>.png)."
)


def _sources(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    for base in (root, root / "omniglot-py"):
        if not base.is_dir():
            continue
        stems: dict[str, Path] = {}
        for p in sorted(base.iterdir()):
            if not p.name.startswith("images_"):
                continue
            if p.is_dir():
                stems[p.name] = p  # an extracted folder wins over its zip (no re-reading)
            elif p.suffix.lower() == ".zip" and p.is_file():
                stems.setdefault(p.stem, p)
        if stems:
            return [stems[k] for k in sorted(stems)]
    return [root]  # maybe an extracted folder laid out <Alphabet>/<character>/*.png itself


def read_characters(
    fn: str, root: str | os.PathLike[str]
) -> tuple[dict[Key, list[tuple[str, bytes]]], list[Key]]:
    """Encoded PNGs per distinct ``(alphabet, character)`` under ``root``, and the duplicates."""
    path = Path(os.path.expanduser(str(root)))
    if not path.exists():
        raise DatasetError(f"{fn}: no Omniglot data at {str(path)!r}. " + _WHERE.format(root=path))
    chars: dict[Key, list[tuple[str, bytes]]] = {}
    duplicates: list[Key] = []
    for src in _sources(path):
        try:
            found, dups = read_omniglot_files(src)
        except DatasetError as err:
            raise DatasetError(
                f"{fn}: no usable Omniglot data at {str(path)!r} ({err}). "
                + _WHERE.format(root=path)
            ) from None
        duplicates += dups
        for key, files in found.items():
            if key in chars:
                duplicates.append(key)
            else:
                chars[key] = files
    return chars, sorted(set(duplicates))


class FullOmniglot(Dataset):
    """Omniglot's characters as one classification dataset (learn2learn's ``FullOmniglot``).

    Items are ``(image, label)``: a PIL ``"L"`` image of 105x105 (as torchvision's ``Omniglot``
    returns it), after ``transform``; ``label`` indexes the character, background set first,
    alphabets and characters in sorted order (so the full set gives learn2learn's 1623 labels in
    its order).

    Difference from learn2learn: characters met twice (Greek and Latin are in both
    background-small zips, with identical images) are kept once, so no class is counted twice
    and a split cannot put the same images in train and test.

    Args:
        root: folder holding the Omniglot zips or extracted folders (``~`` is expanded), or
            one zip.
        transform: applied to each PIL image (e.g. resize, to tensor, invert).
        target_transform: applied to each label.
        download: accepted for compatibility; nothing is downloaded (missing data raises).

    Attributes:
        characters: ``(alphabet, character)`` of each label.
        duplicates: characters that appeared more than once and were kept once.

    Raises:
        metagrad.tasks.DatasetError: no Omniglot data under ``root`` (the message says where
            to put it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        download: bool = False,
    ) -> None:
        chars, self.duplicates = read_characters("l2l.vision.datasets.FullOmniglot", root)
        self.root = os.path.expanduser(str(root))
        self.transform, self.target_transform = transform, target_transform
        self.download = download
        self.characters = list(chars)
        self._files: list[tuple[str, bytes]] = []
        self._labels: list[int] = []
        for label, key in enumerate(self.characters):
            self._files += chars[key]
            self._labels += [label] * len(chars[key])
        self._metagrad_labels = None if target_transform is not None else self._labels

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, item: int) -> tuple[Any, Any]:
        from PIL import Image

        where, data = self._files[item]
        try:
            with Image.open(io.BytesIO(data)) as img:
                image: Any = img.convert("L")
        except OSError as err:
            raise DatasetError(
                f"cannot decode image {where} ({err}); the file is corrupt."
            ) from None
        label: Any = self._labels[item]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label


class DecodedOmniglot(Dataset):
    """Omniglot decoded once to ``[1, S, S]`` float tensors in ``[0, 1]``, strokes = 1.

    The tensors equal learn2learn's benchmark transform ``Resize(S, LANCZOS)``, ``ToTensor()``,
    ``1 - x`` (the decoding is metagrad's :func:`~metagrad.tasks.decode_image`).
    """

    def __init__(
        self, root: str | os.PathLike[str], image_size: int = 28, device: Any = None
    ) -> None:
        chars, self.duplicates = read_characters("l2l.vision.benchmarks.get_tasksets", root)
        self.characters = list(chars)
        arrays, labels = [], []
        for label, key in enumerate(self.characters):
            for where, data in chars[key]:
                size = (image_size, image_size)
                arrays.append(decode_image(data, where, size=size, channels=1, invert=True))
                labels.append(label)
        self.images = torch.from_numpy(np.stack(arrays)).to(device)
        self._metagrad_labels = labels

    def __len__(self) -> int:
        return len(self._metagrad_labels)

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        return self.images[item].float().div_(255.0), self._metagrad_labels[item]


def rotate(image: Any, degrees: float) -> Any:
    """Rotate a ``[..., H, W]`` tensor (or a PIL image) counter-clockwise by ``degrees``.

    Multiples of 90 are exact (``torch.rot90``); other angles use nearest-neighbour sampling
    about the centre with zero fill, as torchvision's ``rotate``.
    """
    if not isinstance(image, Tensor):
        return image.rotate(degrees)
    turns, rest = divmod(float(degrees), 90.0)
    if rest == 0.0:
        return torch.rot90(image, int(turns) % 4, dims=(-2, -1))
    flat = image.reshape(-1, 1, *image.shape[-2:]).float()
    a = math.radians(degrees)
    h, w = flat.shape[-2:]
    # Output pixel -> input pixel: the inverse rotation, in the normalized grid's coordinates.
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]],
        dtype=flat.dtype,
        device=flat.device,
    )
    grid = F.affine_grid(theta.expand(flat.shape[0], 2, 3), list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.reshape(image.shape).to(image.dtype)


class RandomClassRotation(TaskTransform):
    """Rotate all images of a class by one angle drawn per class (learn2learn's transform).

    Appends, to each sample, the rotation of its class; must come after ``LoadData``. This is
    learn2learn's documented behaviour ("applies it to all images from a given class");
    learn2learn's own implementation binds the rotation late and rotates the whole task by
    the angle drawn for its last class.

    Args:
        dataset: the task set's ``MetaDataset``.
        degrees: angles to draw from (counter-clockwise), e.g. ``[0, 90, 180, 270]``.
    """

    def __init__(self, dataset: Any, degrees: Sequence[float]) -> None:
        super().__init__(dataset)
        self.degrees = list(degrees)
        if not self.degrees:
            raise ValueError("l2l.vision.transforms.RandomClassRotation: degrees is empty.")

    def __call__(self, task_description: Any) -> Any:
        if task_description is None:
            task_description = self.new_task()
        angles: dict[Any, float] = {}
        for dd in task_description:
            c = self._label(dd)
            if c not in angles:
                angles[c] = random.choice(self.degrees)
            dd.transforms.append(_Rotate(angles[c]))
        return task_description


class _Rotate:
    def __init__(self, degrees: float) -> None:
        self.degrees = degrees

    def __call__(self, data: Any) -> Any:
        data = list(data)
        data[0] = rotate(data[0], self.degrees)
        return data


BenchmarkTasksets = namedtuple("BenchmarkTasksets", ("train", "validation", "test"))
_BENCHMARKS = ("omniglot",)
_L2L_ONLY = ("mini-imagenet", "tiered-imagenet", "fc100", "cifarfs")
_OPTIONS = ("split", "split_seed", "image_size", "rotations")


def list_tasksets() -> tuple[str, ...]:
    """Names accepted by :func:`get_tasksets` (learn2learn also lists download-only ones)."""
    return _BENCHMARKS


def _class_split(
    ds: DecodedOmniglot, split: str, split_seed: int | None
) -> tuple[list[int], list[int], list[int]]:
    n = len(ds.characters)
    if split == "metagrad":
        parts = split_characters(
            ds.characters, (0.7, 0.1, 0.2), 0 if split_seed is None else split_seed
        )
        index = {key: i for i, key in enumerate(ds.characters)}
        tr, va, te = ([index[k] for k in parts[s]] for s in ("train", "val", "test"))
        return tr, va, te
    classes = list(range(n))
    (random if split_seed is None else random.Random(split_seed)).shuffle(classes)
    if n == sum(L2L_COUNTS):
        n_tr, n_va = L2L_COUNTS[0], L2L_COUNTS[1]
    else:
        n_tr = round(n * L2L_COUNTS[0] / sum(L2L_COUNTS))
        n_va = round(n * L2L_COUNTS[1] / sum(L2L_COUNTS))
    return classes[:n_tr], classes[n_tr : n_tr + n_va], classes[n_tr + n_va :]


def get_tasksets(
    name: str,
    train_ways: int = 5,
    train_samples: int = 10,
    test_ways: int = 5,
    test_samples: int = 10,
    num_tasks: int = -1,
    root: str | os.PathLike[str] = "~/data",
    device: Any = None,
    **kwargs: Any,
) -> BenchmarkTasksets:
    """Train / validation / test task sets of a benchmark, learn2learn's ``get_tasksets``.

    ``"omniglot"`` builds learn2learn's pipeline on the local data: ``FusedNWaysKShots`` over
    the split's classes, ``LoadData``, ``RemapLabels``, ``ConsecutiveLabels``,
    ``RandomClassRotation([0, 90, 180, 270])``; images are ``[1, 28, 28]`` floats with strokes
    at 1. ``taskset.sample()`` returns ``(X [ways * samples, 1, 28, 28], y [ways * samples])``,
    each class a contiguous block of ``samples`` images.

    Args:
        name: ``"omniglot"`` (the only benchmark that needs no download).
        train_ways, train_samples: ways and samples per way (support + query) of train tasks.
        test_ways, test_samples: the same for validation and test tasks.
        num_tasks: ``-1`` (a new task at each access) or the number of cached tasks.
        root: folder with the Omniglot zips or extracted folders (see ``FullOmniglot``).
        device: where the decoded images live (default CPU).
        **kwargs: metagrad options: ``split`` (``"learn2learn"``, default, or ``"metagrad"``;
            see this module's docstring), ``split_seed`` (int; None = the global ``random``,
            as learn2learn), ``image_size`` (28), ``rotations`` (``[0, 90, 180, 270]``).

    Returns:
        ``BenchmarkTasksets(train, validation, test)`` of :class:`TaskDataset`.

    Raises:
        ValueError: an unknown benchmark or option; a split with fewer classes than ways.
        metagrad.tasks.DatasetError: no Omniglot data under ``root`` (says where to put it).
    """
    fn = "l2l.vision.benchmarks.get_tasksets"
    if name not in _BENCHMARKS:
        extra = (
            " It is a learn2learn benchmark that needs a download; metagrad reads local data "
            "only (for a folder-per-class image set: metagrad.tasks.load_image_folder)."
            if name in _L2L_ONLY
            else ""
        )
        raise ValueError(
            f"{fn}: benchmark {name!r} is not available.{extra} Available: {list(_BENCHMARKS)}."
        )
    unknown = sorted(set(kwargs) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"{fn}: unknown options {unknown}; accepted: {list(_OPTIONS)}.")
    split = kwargs.get("split", "learn2learn")
    if split not in ("learn2learn", "metagrad"):
        raise ValueError(f"{fn}: split={split!r} must be 'learn2learn' or 'metagrad'.")
    ds = DecodedOmniglot(root, int(kwargs.get("image_size", 28)), device)
    dataset = MetaDataset(ds)
    parts = _class_split(ds, split, kwargs.get("split_seed"))
    rotations = list(kwargs.get("rotations", [0.0, 90.0, 180.0, 270.0]))
    sets = []
    for part, classes, ways, samples in zip(
        ("train", "validation", "test"),
        parts,
        (train_ways, test_ways, test_ways),
        (train_samples, test_samples, test_samples),
    ):
        if len(classes) < ways:
            raise ValueError(
                f"{fn}: the {part} split has {len(classes)} classes ({len(ds.characters)} "
                f"distinct characters under {str(root)!r}, split={split!r}), fewer than "
                f"{ways} ways. Fix: lower the ways or add data (e.g. images_evaluation.zip)."
            )
        small = [c for c in classes if len(dataset.labels_to_indices[c]) < samples]
        if small:
            raise ValueError(
                f"{fn}: {samples} samples per class are needed but character "
                f"{'/'.join(ds.characters[small[0]])} has {len(dataset.labels_to_indices[small[0]])}."
            )
        transforms: list[Any] = [
            FusedNWaysKShots(dataset, n=ways, k=samples, filter_labels=classes),
            LoadData(dataset),
            RemapLabels(dataset),
            ConsecutiveLabels(dataset),
        ]
        if rotations:
            transforms.append(RandomClassRotation(dataset, rotations))
        sets.append(TaskDataset(dataset, transforms, num_tasks=num_tasks))
    return BenchmarkTasksets(*sets)
