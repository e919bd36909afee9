"""learn2learn's task transforms (``l2l.data.transforms``): how a task is cut from a dataset.

A task transform maps a task description (a list of :class:`DataDescription`, or ``None`` for
"every sample of the dataset") to a new one. Sampling transforms (``NWays``, ``KShots``,
``FusedNWaysKShots``, ``FilterLabels``) choose which samples the task holds; data transforms
(``LoadData``, ``RemapLabels``) append a function to each sample's ``transforms``; and
``ConsecutiveLabels`` reorders the samples. Random choices use Python's global ``random``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable
from typing import Any

from metagrad.compat._l2l_data import DataDescription, MetaDataset

Description = list[DataDescription]


def _meta(fn: str, dataset: Any) -> MetaDataset:
    if not isinstance(dataset, MetaDataset):
        raise TypeError(
            f"{fn}: dataset must be an l2l.data.MetaDataset (the one the TaskDataset uses), got "
            f"{type(dataset).__name__}. Wrap it first: dataset = l2l.data.MetaDataset(dataset)."
        )
    return dataset


class TaskTransform:
    """Base class: holds the dataset; ``new_task()`` describes every sample of it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = _meta(f"l2l.data.transforms.{type(self).__name__}", dataset)

    def new_task(self) -> Description:
        return [DataDescription(i) for i in range(len(self.dataset))]

    def __call__(self, task_description: Description | None) -> Description:
        raise NotImplementedError

    def _label(self, dd: DataDescription) -> Any:
        return self.dataset.indices_to_labels[dd.index]


class LoadData(TaskTransform):
    """Append the loading step ``index -> dataset[index]`` to every sample."""

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        dataset = self.dataset
        for dd in task_description:
            dd.transforms.append(dataset.__getitem__)
        return task_description


class FilterLabels(TaskTransform):
    """Keep only the samples whose label is in ``labels``.

    Args:
        dataset: the task set's ``MetaDataset``.
        labels: labels to keep.
    """

    def __init__(self, dataset: Any, labels: Iterable[Any]) -> None:
        super().__init__(dataset)
        self.labels = list(labels)
        self._keep = set(self.labels)

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        return [dd for dd in task_description if self._label(dd) in self._keep]


class ConsecutiveLabels(TaskTransform):
    """Sort the samples by their dataset label, so each class is one contiguous block.

    The sort uses the *dataset's* labels (learn2learn's semantics): after ``RemapLabels`` the
    blocks are contiguous but their new labels are in shuffled order.
    """

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        return sorted(task_description, key=self._label)


class RemapLabels(TaskTransform):
    """Relabel the task's classes ``0..N-1`` (in random order unless ``shuffle=False``).

    Args:
        dataset: the task set's ``MetaDataset``.
        shuffle: random assignment of new labels (default); False keeps the sorted order of
            the dataset labels.

    The relabelling is applied to the loaded sample ``(x, label, ...)``, so it must come after
    ``LoadData``.
    """

    def __init__(self, dataset: Any, shuffle: bool = True) -> None:
        super().__init__(dataset)
        self.shuffle = shuffle

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        labels = _sorted({self._label(dd) for dd in task_description})
        if self.shuffle:
            random.shuffle(labels)
        mapping = {lab: new for new, lab in enumerate(labels)}

        def remap(data: Any) -> list[Any]:
            data = list(data)
            data[1] = mapping[_plain(data[1])]
            return data

        for dd in task_description:
            dd.transforms.append(remap)
        return task_description


def _sorted(labels: set[Any]) -> list[Any]:
    try:
        return sorted(labels)
    except TypeError:  # labels of mixed types: any fixed order will do
        return sorted(labels, key=repr)


def _plain(label: Any) -> Any:
    return label.item() if hasattr(label, "item") else label


def _sample(fn: str, population: list[Any], k: int, what: str) -> list[Any]:
    if k > len(population):
        raise ValueError(
            f"{fn}: asked for {k} {what} but only {len(population)} are available. Fix: lower "
            f"the number of ways/shots, or use a split with more classes/samples."
        )
    return random.sample(population, k)


class NWays(TaskTransform):
    """Keep the samples of ``n`` random labels among those in the description.

    Args:
        dataset: the task set's ``MetaDataset``.
        n: number of labels (ways).

    Raises:
        ValueError: fewer than ``n`` labels are available.
    """

    def __init__(self, dataset: Any, n: int = 2) -> None:
        super().__init__(dataset)
        self.n = int(n)

    def new_task(self) -> Description:
        classes = _sample("l2l.data.transforms.NWays", list(self.dataset.labels), self.n, "ways")
        l2i = self.dataset.labels_to_indices
        return [DataDescription(i) for c in classes for i in l2i[c]]

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            return self.new_task()
        present = list(dict.fromkeys(self._label(dd) for dd in task_description))
        keep = set(_sample("l2l.data.transforms.NWays", present, self.n, "ways"))
        return [dd for dd in task_description if self._label(dd) in keep]


class KShots(TaskTransform):
    """Keep ``k`` random samples of every label present.

    Args:
        dataset: the task set's ``MetaDataset``.
        k: samples per label (learn2learn's benchmarks pass ``2 * shots``: support + query).
        replacement: sample with replacement (repeated samples are copies).

    Raises:
        ValueError: a label has fewer than ``k`` samples and ``replacement`` is False.
    """

    def __init__(self, dataset: Any, k: int = 1, replacement: bool = False) -> None:
        super().__init__(dataset)
        self.k = int(k)
        self.replacement = bool(replacement)

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            task_description = self.new_task()
        by_class: dict[Any, Description] = {}
        for dd in task_description:
            by_class.setdefault(self._label(dd), []).append(dd)
        out: Description = []
        for dds in by_class.values():
            if self.replacement:
                out += [copy.deepcopy(dd) for dd in random.choices(dds, k=self.k)]
            else:
                out += _sample("l2l.data.transforms.KShots", dds, self.k, "shots of a class")
        return out


class FusedNWaysKShots(TaskTransform):
    """``FilterLabels``, ``NWays`` and ``KShots`` in one step (the fast path of the benchmarks).

    Args:
        dataset: the task set's ``MetaDataset``.
        n: ways.
        k: samples per way.
        replacement: sample the shots with replacement.
        filter_labels: labels to draw from (default: all), e.g. a benchmark split's classes.

    Raises:
        ValueError: fewer than ``n`` labels, or a chosen label with fewer than ``k`` samples.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from metagrad.compat._l2l_data import MetaDataset
        >>> data = MetaDataset(TensorDataset(torch.arange(12.0), torch.arange(4).repeat(3)))
        >>> description = FusedNWaysKShots(data, n=2, k=3, filter_labels=[1, 3])(None)
        >>> sorted(data.indices_to_labels[dd.index] for dd in description)
        [1, 1, 1, 3, 3, 3]
    """

    def __init__(
        self,
        dataset: Any,
        n: int = 2,
        k: int = 1,
        replacement: bool = False,
        filter_labels: Iterable[Any] | None = None,
    ) -> None:
        super().__init__(dataset)
        self.n, self.k, self.replacement = int(n), int(k), bool(replacement)
        labels = self.dataset.labels if filter_labels is None else filter_labels
        self.filter_labels = list(labels)
        self.filter = FilterLabels(self.dataset, self.filter_labels)
        self.nways = NWays(self.dataset, self.n)
        self.kshots = KShots(self.dataset, self.k, self.replacement)

    def new_task(self) -> Description:
        fn = "l2l.data.transforms.FusedNWaysKShots"
        out: Description = []
        l2i = self.dataset.labels_to_indices
        for lab in _sample(fn, self.filter_labels, self.n, "ways"):
            ix = l2i[lab]
            if self.replacement:
                picked = [random.choice(ix) for _ in range(self.k)]
            else:
                picked = _sample(fn, ix, self.k, f"samples of class {lab!r}")
            out += [DataDescription(i) for i in picked]
        return out

    def __call__(self, task_description: Description | None) -> Description:
        if task_description is None:
            return self.new_task()
        return self.kshots(self.nways(self.filter(task_description)))
