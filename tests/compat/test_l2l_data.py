"""``l2l.data``: label bookkeeping, task transforms and task sets, with learn2learn's semantics."""

from __future__ import annotations

import copy
import doctest
import random

import pytest
import torch
from torch.utils.data import TensorDataset

import metagrad.compat._l2l_data as data_impl
import metagrad.compat._l2l_transforms as transforms_impl
import metagrad.compat.learn2learn as l2l

T = l2l.data.transforms


def labelled(per_class: int = 4, classes: int = 6) -> TensorDataset:
    """Sample i is the scalar i; labels 0..classes-1, interleaved (0, 1, 2, ..., 0, 1, ...)."""
    n = per_class * classes
    return TensorDataset(
        torch.arange(n, dtype=torch.float32), torch.arange(classes).repeat(per_class)
    )


def test_public_layout() -> None:
    assert l2l.data.Taskset is l2l.data.TaskDataset
    for name in ("NWays", "KShots", "LoadData", "RemapLabels", "ConsecutiveLabels",
                 "FilterLabels", "FusedNWaysKShots"):  # fmt: skip
        assert hasattr(l2l.data.transforms, name)
    assert l2l.detach_module is l2l.utils.detach_module
    assert l2l.algorithms.GBML is l2l.GBML


def test_metadataset_bookkeeping_three_ways() -> None:
    ds = labelled(per_class=2, classes=3)
    meta = l2l.data.MetaDataset(ds)
    assert meta.labels == [0, 1, 2]
    assert meta.labels_to_indices == {0: [0, 3], 1: [1, 4], 2: [2, 5]}
    assert meta.indices_to_labels[4] == 1 and len(meta) == 6
    assert float(meta[4][0]) == 4.0
    from_l2i = l2l.data.MetaDataset(ds, labels_to_indices=meta.labels_to_indices)
    from_i2l = l2l.data.MetaDataset(ds, indices_to_labels=meta.indices_to_labels)
    assert from_l2i.indices_to_labels == from_i2l.indices_to_labels == meta.indices_to_labels


def test_metadataset_rejects_non_datasets_and_bad_items() -> None:
    with pytest.raises(TypeError, match=r"MetaDataset: dataset must be a torch.utils.data.Dataset"):
        l2l.data.MetaDataset([(1, 0)])
    bad = TensorDataset(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="labels must be scalars"):
        l2l.data.MetaDataset(bad)


def test_union_shifts_labels_of_later_datasets() -> None:
    a = labelled(per_class=2, classes=2)  # labels 0, 1
    b = labelled(per_class=1, classes=3)  # labels 0, 1, 2 -> 2, 3, 4
    union = l2l.data.UnionMetaDataset([a, b])
    assert union.labels == [0, 1, 2, 3, 4] and len(union) == 7
    assert union[4][1] == 2 and float(union[4][0]) == 0.0  # first item of b
    assert union.labels_to_indices[4] == [6]
    with pytest.raises(IndexError):
        union[7]


def test_filtered_keeps_original_labels() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=2, classes=4))
    kept = l2l.data.FilteredMetaDataset(meta, [3, 1])
    assert kept.labels == [3, 1] and len(kept) == 4
    assert [kept[i][1].item() for i in range(4)] == [3, 3, 1, 1]
    with pytest.raises(ValueError, match=r"labels \[9\] are not in the dataset"):
        l2l.data.FilteredMetaDataset(meta, [9])


def pipeline(meta: l2l.data.MetaDataset, n: int, k: int) -> list:
    return [
        T.NWays(meta, n=n),
        T.KShots(meta, k=k),
        T.LoadData(meta),
        T.RemapLabels(meta),
        T.ConsecutiveLabels(meta),
    ]


def test_nways_kshots_task_shape_and_labels() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=5, classes=8))
    tasks = l2l.data.TaskDataset(meta, pipeline(meta, n=3, k=4))
    for _ in range(20):
        X, y = tasks.sample()
        assert X.shape == (12,) and y.dtype == torch.int64
        assert sorted(set(y.tolist())) == [0, 1, 2]
        # ConsecutiveLabels: each class is one contiguous block of k samples.
        blocks = [y[i : i + 4].unique().numel() for i in range(0, 12, 4)]
        assert blocks == [1, 1, 1] and y[::4].unique().numel() == 3
        # The samples are real members of their (hidden) dataset class, one class per block.
        original = [meta.indices_to_labels[int(v)] for v in X.tolist()]
        assert all(len(set(original[i : i + 4])) == 1 for i in range(0, 12, 4))


def test_remap_shuffles_new_labels_unless_told_not_to() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=2, classes=5))
    fixed = l2l.data.TaskDataset(
        meta,
        [
            T.NWays(meta, 3),
            T.LoadData(meta),
            T.RemapLabels(meta, shuffle=False),
            T.ConsecutiveLabels(meta),
        ],
    )
    for _ in range(10):
        _, y = fixed.sample()
        assert y.tolist() == [0, 0, 1, 1, 2, 2]  # sorted dataset labels -> 0, 1, 2
    shuffled = l2l.data.TaskDataset(meta, pipeline(meta, 3, 2))
    orders = {tuple(shuffled.sample()[1].tolist()) for _ in range(30)}
    assert len(orders) > 1  # block order of new labels varies: remapping is random


def test_filter_labels_and_fused_draw_only_allowed_classes() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=4, classes=10))
    allowed = [2, 5, 7]
    for first in (T.FusedNWaysKShots(meta, n=2, k=3, filter_labels=allowed),):
        tasks = l2l.data.TaskDataset(meta, [first, T.LoadData(meta)])
        for _ in range(20):
            X, y = tasks.sample()
            assert set(y.tolist()) <= set(allowed) and len(set(y.tolist())) == 2
            assert X.shape == (6,)
    chain = l2l.data.TaskDataset(
        meta, [T.FilterLabels(meta, allowed), T.NWays(meta, 2), T.KShots(meta, 3), T.LoadData(meta)]
    )
    for _ in range(20):
        assert set(chain.sample()[1].tolist()) <= set(allowed)
    # The fused transform applied to an existing description = filter, nways, kshots.
    desc = T.FusedNWaysKShots(meta, n=2, k=1, filter_labels=allowed)(
        T.FilterLabels(meta, [0, 2, 5])(None)
    )
    assert len(desc) == 2 and {meta.indices_to_labels[d.index] for d in desc} <= set(allowed)


def test_replacement_allows_more_shots_than_samples() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=2, classes=3))
    tasks = l2l.data.TaskDataset(
        meta, [T.FusedNWaysKShots(meta, n=2, k=5, replacement=True), T.LoadData(meta)]
    )
    X, _ = tasks.sample()
    assert X.shape == (10,)
    kshots = l2l.data.TaskDataset(meta, [T.NWays(meta, 2), T.KShots(meta, 5, replacement=True)])
    assert len(kshots.sample_task_description()) == 10


def test_too_many_ways_or_shots_name_the_fix() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=2, classes=3))
    with pytest.raises(ValueError, match=r"NWays: asked for 4 ways but only 3"):
        T.NWays(meta, 4)(None)
    with pytest.raises(ValueError, match=r"KShots: asked for 3 shots .* only 2"):
        T.KShots(meta, 3)(T.NWays(meta, 2)(None))
    with pytest.raises(ValueError, match=r"FusedNWaysKShots: asked for 3 samples of class"):
        T.FusedNWaysKShots(meta, n=2, k=3)(None)
    with pytest.raises(TypeError, match="Wrap it first"):
        T.NWays(labelled(), 2)


def test_num_tasks_caches_descriptions() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=4, classes=6))
    tasks = l2l.data.TaskDataset(meta, pipeline(meta, 2, 2), num_tasks=5)
    assert len(tasks) == 5
    first = tasks[3]
    for _ in range(3):
        again = tasks[3]
        assert torch.equal(first[0], again[0])
    assert len(list(tasks)) == 5  # iteration stops after num_tasks
    infinite = l2l.data.TaskDataset(meta, pipeline(meta, 2, 2))
    assert len(infinite) == 1
    assert len({tuple(infinite[0][0].tolist()) for _ in range(20)}) > 1
    for bad in (0, -2):
        with pytest.raises(ValueError, match="num_tasks must be -1"):
            l2l.data.TaskDataset(meta, num_tasks=bad)
    with pytest.raises(IndexError):
        tasks[5]


def test_sampling_follows_the_global_random_seed() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=4, classes=6))
    tasks = l2l.data.TaskDataset(meta, pipeline(meta, 3, 2))
    random.seed(7)
    a = [tasks.sample()[0].tolist() for _ in range(3)]
    random.seed(7)
    b = [tasks.sample()[0].tolist() for _ in range(3)]
    assert a == b


def test_callable_task_transforms_and_custom_collate() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=2, classes=3))
    one = T.FusedNWaysKShots(meta, n=2, k=1)
    tasks = l2l.data.TaskDataset(meta, one, task_collate=len)
    assert tasks.sample() == 2
    with pytest.raises(ValueError, match="produced no task description"):
        l2l.data.TaskDataset(meta, []).sample()


def test_loaded_samples_are_independent_of_the_description_copy() -> None:
    meta = l2l.data.MetaDataset(labelled(per_class=2, classes=3))
    desc = T.NWays(meta, 2)(None)
    twin = copy.deepcopy(desc)
    tasks = l2l.data.TaskDataset(meta)
    assert torch.equal(tasks.get_task(T.LoadData(meta)(desc))[0],
                       tasks.get_task(T.LoadData(meta)(twin))[0])  # fmt: skip


def test_partition_task_support_first_per_label() -> None:
    x = torch.arange(12.0).view(6, 2)
    y = torch.tensor([2, 0, 2, 0, 2, 0])
    (xs, ys), (xq, yq) = l2l.data.partition_task(x, y, shots=1)
    assert ys.tolist() == [0, 2] and yq.tolist() == [0, 0, 2, 2]
    assert xs[:, 0].tolist() == [2.0, 0.0] and xq[:, 0].tolist() == [6.0, 10.0, 4.0, 8.0]
    with pytest.raises(ValueError, match="label 0 has 4 samples"):
        l2l.data.partition_task(x, torch.tensor([2, 0, 2, 0, 0, 0]), shots=1)
    with pytest.raises(ValueError, match="5 samples cannot be 2 ways x 1 shots"):
        l2l.data.partition_task(x[:5], y[:5], shots=1)
    with pytest.raises(ValueError, match="6 samples but 5 labels"):
        l2l.data.partition_task(x, y[:5])


def test_infinite_iterator_restarts() -> None:
    it = l2l.data.InfiniteIterator([[1], [2], [3]])
    assert [next(it) for _ in range(7)] == [[1], [2], [3], [1], [2], [3], [1]]
    with pytest.raises(ValueError, match="empty"):
        next(l2l.data.InfiniteIterator([]))


def test_docstring_examples_run() -> None:
    for mod in (data_impl, transforms_impl):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
