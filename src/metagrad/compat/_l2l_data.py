"""learn2learn's ``l2l.data`` containers: label bookkeeping over a dataset, and task sets.

A :class:`MetaDataset` wraps any map-style ``torch.utils.data.Dataset`` of ``(x, label)`` items
and indexes it by label. A :class:`TaskDataset` turns it into tasks: each task is built by a
chain of *task transforms* (``l2l.data.transforms``) acting on a *task description*, a list of
:class:`DataDescription` (a sample index plus the functions that will turn the index into data),
then the samples are loaded and collated. Sampling uses Python's global ``random`` module, as
learn2learn does, so ``random.seed(...)`` makes a script's tasks reproducible.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

Transform = Callable[[Any], Any]


class DataDescription:
    """One sample of a task: its index in the dataset and the functions that load/alter it.

    Attributes:
        index: position of the sample in the task set's dataset.
        transforms: applied in order to ``index`` to produce the sample (``LoadData`` adds the
            loading step, ``RemapLabels`` the new label, ...).
    """

    __slots__ = ("index", "transforms")

    def __init__(self, index: int) -> None:
        self.index = int(index)
        self.transforms: list[Transform] = []

    def __repr__(self) -> str:
        return f"DataDescription(index={self.index}, transforms={len(self.transforms)})"


def _label_of(item: Any, fn: str, i: int) -> Any:
    try:
        label = item[1]
    except (TypeError, IndexError, KeyError):
        raise TypeError(
            f"{fn}: item {i} of the dataset is {type(item).__name__}, not an (x, label) pair. "
            f"Wrap a classification dataset whose items are (data, label)."
        ) from None
    if isinstance(label, Tensor):
        if label.numel() != 1:
            raise ValueError(
                f"{fn}: item {i} has a label tensor of shape {tuple(label.shape)}; labels must "
                f"be scalars (class indices)."
            )
        return label.item()
    return label


class MetaDataset(Dataset):
    """A classification dataset indexed by label (learn2learn's ``l2l.data.MetaDataset``).

    Attributes:
        dataset: the wrapped dataset; ``meta[i] == dataset[i]``.
        labels_to_indices: ``{label: [indices of its samples]}``.
        indices_to_labels: ``{index: label}``.
        labels: the labels, in order of first appearance.

    Args:
        dataset: a map-style ``torch.utils.data.Dataset`` whose items are ``(x, label)``.
        labels_to_indices: optional precomputed bookkeeping (the other map is derived from it).
        indices_to_labels: optional precomputed bookkeeping.

    Without precomputed maps, every item is read once to learn its label (as learn2learn does),
    except for metagrad's own datasets, which know their labels without decoding images.
    learn2learn's on-disk bookkeeping cache (``_bookkeeping_path``) is not used: nothing is
    written next to your data.

    Raises:
        TypeError: ``dataset`` is not a ``Dataset``, or its items are not ``(x, label)`` pairs.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(6, 2), torch.tensor([0, 1, 0, 2, 1, 2]))
        >>> MetaDataset(data).labels_to_indices[2]
        [3, 5]
    """

    def __init__(
        self,
        dataset: Any,
        labels_to_indices: Mapping[Any, Sequence[int]] | None = None,
        indices_to_labels: Mapping[int, Any] | None = None,
    ) -> None:
        fn = "l2l.data.MetaDataset"
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"{fn}: dataset must be a torch.utils.data.Dataset, got {type(dataset).__name__}."
                f" Wrap tensors in torch.utils.data.TensorDataset(x, y)."
            )
        self.dataset: Any = dataset
        if labels_to_indices is not None:
            l2i = {lab: list(ix) for lab, ix in labels_to_indices.items()}
        elif indices_to_labels is not None:
            l2i = {}
            for i, lab in indices_to_labels.items():
                l2i.setdefault(lab, []).append(int(i))
        else:
            known = getattr(dataset, "_metagrad_labels", None)
            labels = list(known) if known is not None else None
            if labels is None:
                labels = [_label_of(dataset[i], fn, i) for i in range(len(cast(Sized, dataset)))]
            l2i = {}
            for i, lab in enumerate(labels):
                l2i.setdefault(lab, []).append(i)
        self._set_bookkeeping(l2i)

    def _set_bookkeeping(self, labels_to_indices: dict[Any, list[int]]) -> None:
        self.labels_to_indices = labels_to_indices
        self.indices_to_labels = {i: lab for lab, ix in labels_to_indices.items() for i in ix}
        self.labels = list(labels_to_indices)

    def __getitem__(self, item: int) -> Any:
        return self.dataset[item]

    def __len__(self) -> int:
        return len(self.dataset)


class UnionMetaDataset(MetaDataset):
    """The union of several datasets, each one's labels shifted past the previous ones'.

    Same label in two datasets = two different labels in the union (learn2learn's semantics):
    the labels of dataset ``d`` become ``offset_d + position of the label in d.labels``, where
    ``offset_d`` is the number of labels of the datasets before it.

    Args:
        datasets: ``MetaDataset`` s (plain datasets are wrapped).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> a = TensorDataset(torch.zeros(2, 1), torch.tensor([0, 1]))
        >>> b = TensorDataset(torch.ones(2, 1), torch.tensor([0, 0]))
        >>> union = UnionMetaDataset([a, b])
        >>> union.labels, union[2][1]
        ([0, 1, 2], 2)
    """

    def __init__(self, datasets: Iterable[Any]) -> None:
        self.datasets = [d if isinstance(d, MetaDataset) else MetaDataset(d) for d in datasets]
        if not self.datasets:
            raise ValueError("l2l.data.UnionMetaDataset: datasets is empty; pass at least one.")
        l2i: dict[Any, list[int]] = {}
        self._starts: list[int] = []
        n_items = n_labels = 0
        for d in self.datasets:
            self._starts.append(n_items)
            position = {lab: j for j, lab in enumerate(d.labels)}
            for lab, ix in d.labels_to_indices.items():
                l2i.setdefault(n_labels + position[lab], []).extend(n_items + i for i in ix)
            n_items += len(d)
            n_labels += len(d.labels)
        self.dataset = self.datasets[0]
        self._set_bookkeeping({k: sorted(v) for k, v in sorted(l2i.items())})

    def __getitem__(self, item: int) -> Any:
        if not 0 <= item < len(self):
            raise IndexError(f"l2l.data.UnionMetaDataset: index {item} out of range({len(self)}).")
        d = bisect.bisect_right(self._starts, item) - 1
        data = list(self.datasets[d][item - self._starts[d]])
        data[1] = self.indices_to_labels[item]
        return data

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)


class FilteredMetaDataset(MetaDataset):
    """Only the samples of the given labels; labels are kept (not remapped).

    Samples are renumbered ``0..len-1`` label by label, in the order of ``labels``.

    Args:
        dataset: a ``MetaDataset`` (a plain dataset is wrapped).
        labels: the labels to keep.

    Raises:
        ValueError: a label that the dataset does not have.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(4.0), torch.tensor([0, 1, 2, 1]))
        >>> kept = FilteredMetaDataset(data, [1])
        >>> len(kept), kept.labels, float(kept[1][0])
        (2, [1], 3.0)
    """

    def __init__(self, dataset: Any, labels: Iterable[Any]) -> None:
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        self.dataset = dataset
        labels = list(labels)
        missing = [lab for lab in labels if lab not in dataset.labels_to_indices]
        if missing:
            raise ValueError(
                f"l2l.data.FilteredMetaDataset: labels {missing[:5]} are not in the dataset "
                f"(it has {len(dataset.labels)} labels, e.g. {dataset.labels[:5]})."
            )
        self.to_true_indices: list[int] = []
        l2i: dict[Any, list[int]] = {}
        for lab in labels:
            for true in dataset.labels_to_indices[lab]:
                l2i.setdefault(lab, []).append(len(self.to_true_indices))
                self.to_true_indices.append(true)
        self._set_bookkeeping(l2i)

    def __getitem__(self, item: int) -> Any:
        return self.dataset[self.to_true_indices[item]]

    def __len__(self) -> int:
        return len(self.to_true_indices)


class TaskDataset:
    """Tasks sampled from a dataset by a chain of task transforms (learn2learn's ``Taskset``).

    With ``num_tasks=-1`` every access draws a new task (and ``len`` is 1); with
    ``num_tasks=N`` the description of task ``i`` is drawn on first access and cached, so
    ``taskset[i]`` is the same task every time (its data transforms, e.g. rotations, rerun).

    Args:
        dataset: a ``MetaDataset`` (a plain dataset is wrapped).
        task_transforms: list of task transforms, applied in order to a description that
            starts as ``None`` (the first transform creates it), or one callable.
        num_tasks: ``-1`` (infinite) or a positive number of cached tasks.
        task_collate: turns the list of samples into a batch (default:
            ``torch.utils.data.default_collate``: ``(X, y)`` tensors).

    Raises:
        ValueError: ``num_tasks`` is 0 or below -1.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from metagrad.compat._l2l_transforms import KShots, LoadData, NWays
        >>> data = MetaDataset(TensorDataset(torch.randn(20, 3), torch.arange(5).repeat(4)))
        >>> tasks = TaskDataset(data, [NWays(data, n=2), KShots(data, k=3), LoadData(data)])
        >>> X, y = tasks.sample()
        >>> tuple(X.shape), len(set(y.tolist()))
        ((6, 3), 2)
    """

    def __init__(
        self,
        dataset: Any,
        task_transforms: Sequence[Transform] | Transform | None = None,
        num_tasks: int = -1,
        task_collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if not isinstance(dataset, MetaDataset):
            dataset = MetaDataset(dataset)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < -1:
            num_tasks = 0  # reported below
        if num_tasks == 0:
            raise ValueError(
                "l2l.data.TaskDataset: num_tasks must be -1 (a new task at every access) or a "
                "positive number of tasks to draw once and cache."
            )
        self.dataset = dataset
        self.task_transforms = [] if task_transforms is None else task_transforms
        self.num_tasks = num_tasks
        self.task_collate = default_collate if task_collate is None else task_collate
        self.sampled_descriptions: dict[int, list[DataDescription]] = {}
        self._task_id = 0

    def sample_task_description(self) -> list[DataDescription]:
        """A new task description (the transforms applied to ``None``)."""
        if callable(self.task_transforms):
            return self.task_transforms(None)  # type: ignore[no-any-return]
        description: Any = None
        for transform in self.task_transforms:
            description = transform(description)
        if description is None:
            raise ValueError(
                "l2l.data.TaskDataset: task_transforms produced no task description; start the "
                "list with a sampling transform such as NWays, KShots or FusedNWaysKShots."
            )
        return list(description)

    def get_task(self, task_description: Iterable[DataDescription]) -> Any:
        """Load and collate the samples of a description."""
        samples = []
        for dd in task_description:
            data: Any = dd.index
            for transform in dd.transforms:
                data = transform(data)
            samples.append(data)
        return self.task_collate(samples)

    def sample(self) -> Any:
        """A random task: ``X, y = taskset.sample()``."""
        return self[random.randint(0, len(self) - 1)]

    def __len__(self) -> int:
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __getitem__(self, i: int) -> Any:
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if not -self.num_tasks <= i < self.num_tasks:
            raise IndexError(
                f"l2l.data.TaskDataset: task {i} out of range (num_tasks={self.num_tasks})."
            )
        i %= self.num_tasks
        if i not in self.sampled_descriptions:
            self.sampled_descriptions[i] = self.sample_task_description()
        return self.get_task(self.sampled_descriptions[i])

    def __iter__(self) -> Iterator[Any]:
        self._task_id = 0
        return self

    def __next__(self) -> Any:
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if self._task_id >= self.num_tasks:
            raise StopIteration
        self._task_id += 1
        return self[self._task_id - 1]

    def __add__(self, other: object) -> Any:
        raise NotImplementedError("l2l.data.TaskDataset: adding task sets is not supported.")


Taskset = TaskDataset


def partition_task(
    data: Tensor, labels: Tensor, shots: int = 1, ways: int | None = None
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split one task into support (the first ``shots`` samples of each label) and query.

    Labels are visited in sorted order; every label must have the same number of samples.

    Args:
        data: ``[M, ...]`` samples.
        labels: ``[M]`` labels.
        shots: support samples per label.
        ways: number of labels (default: the number of distinct labels).

    Returns:
        ``((support_data, support_labels), (query_data, query_labels))``, label by label.

    Raises:
        ValueError: lengths differ, or labels have unequal counts, or fewer than ``shots``.

    Example:
        >>> import torch
        >>> x, y = torch.arange(6.0), torch.tensor([1, 0, 1, 0, 1, 0])
        >>> (xs, ys), (xq, yq) = partition_task(x, y, shots=1)
        >>> xs.tolist(), yq.tolist()
        ([1.0, 0.0], [0, 0, 1, 1])
    """
    fn = "l2l.data.partition_task"
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"{fn}: {data.shape[0]} samples but {labels.shape[0]} labels.")
    unique = labels.unique()
    ways = int(unique.numel()) if ways is None else ways
    n_query = data.shape[0] - ways * shots
    if ways <= 0 or n_query < 0 or n_query % ways:
        raise ValueError(
            f"{fn}: {data.shape[0]} samples cannot be {ways} ways x {shots} shots plus an equal "
            f"number of queries per label."
        )
    per = shots + n_query // ways
    sup, qry = [], []
    for lab in unique:
        idx = (labels == lab).nonzero(as_tuple=True)[0]
        if idx.numel() != per:
            raise ValueError(
                f"{fn}: label {lab.item()} has {idx.numel()} samples; every label needs {per} "
                f"({shots} shots + {per - shots} queries)."
            )
        sup.append(idx[:shots])
        qry.append(idx[shots:])
    s, q = torch.cat(sup), torch.cat(qry)
    return (data[s], labels[s]), (data[q], labels[q])


class InfiniteIterator:
    """Iterate a data loader forever, restarting it when exhausted.

    Example:
        >>> it = InfiniteIterator([1, 2])
        >>> [next(it) for _ in range(5)]
        [1, 2, 1, 2, 1]
    """

    def __init__(self, dataloader: Iterable[Any]) -> None:
        self.dataloader = dataloader
        self.iterator = iter(dataloader)

    def __iter__(self) -> InfiniteIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.dataloader)
            try:
                return next(self.iterator)
            except StopIteration:
                raise ValueError("l2l.data.InfiniteIterator: the data loader is empty.") from None
