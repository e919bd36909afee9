"""N-way K-shot sampling over folder-per-class images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metagrad.tasks import DatasetError, FewShotTasks, ImageClasses, load_image_folder


def _classes(n_classes: int = 7, per_class: int = 6) -> ImageClasses:
    # Each image's pixels encode (class, index) so the sampled tensors can be traced back.
    imgs = torch.zeros(n_classes * per_class, 1, 2, 2, dtype=torch.uint8)
    for c in range(n_classes):
        for i in range(per_class):
            imgs[c * per_class + i, 0, 0, 0] = c
            imgs[c * per_class + i, 0, 0, 1] = i
    targets = torch.arange(n_classes).repeat_interleave(per_class)
    return ImageClasses(imgs, targets, [f"c{c}" for c in range(n_classes)])


def test_shapes_labels_and_consistency() -> None:
    data = _classes()
    N, K, Q, T = 3, 2, 4, 10
    xs, ys, xq, yq = FewShotTasks(data, N, K, Q, seed=0).sample(T)
    assert xs.shape == (T, N * K, 1, 2, 2) and xq.shape == (T, N * Q, 1, 2, 2)
    assert ys.dtype == yq.dtype == torch.long
    assert torch.equal(ys[0], torch.tensor([0, 0, 1, 1, 2, 2]))
    cls_s = (xs[:, :, 0, 0, 0] * 255).round().long()
    idx_s = (xs[:, :, 0, 0, 1] * 255).round().long()
    cls_q = (xq[:, :, 0, 0, 0] * 255).round().long()
    idx_q = (xq[:, :, 0, 0, 1] * 255).round().long()
    for t in range(T):
        for lab in range(N):
            sc, qc = cls_s[t][ys[t] == lab], cls_q[t][yq[t] == lab]
            assert len(set(sc.tolist() + qc.tolist())) == 1  # one class per label
            chosen = set(idx_s[t][ys[t] == lab].tolist()) | set(idx_q[t][yq[t] == lab].tolist())
            assert len(chosen) == K + Q  # distinct images, support and query disjoint
        assert len(set(cls_s[t].tolist())) == N  # N distinct classes
    # labels are a fresh permutation: label 0 is not always the same class
    assert len(set(cls_s[:, 0].tolist())) > 1


def test_deterministic_and_state_round_trip() -> None:
    data = _classes()
    a = FewShotTasks(data, 3, 1, 2, seed=5).sample(4)
    b = FewShotTasks(data, 3, 1, 2, seed=5).sample(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    s = FewShotTasks(data, 3, 1, 2, seed=5)
    saved = s.state_dict()
    first = s.sample(4)
    s.load_state_dict(saved)
    assert torch.equal(s.sample(4).xs, first.xs)


def test_uneven_class_sizes_only_pick_existing_images() -> None:
    data = _classes(4, 8).subset([0, 1, 2, 3])
    keep = torch.ones(len(data.targets), dtype=torch.bool)
    keep[(data.targets == 2).nonzero()[:5]] = False  # class 2 keeps 3 images
    small = ImageClasses(data.images[keep], data.targets[keep], data.names)
    xs, _ys, xq, _yq = FewShotTasks(small, 4, 1, 2, seed=0).sample(50)
    cls = (torch.cat([xs, xq], 1)[:, :, 0, 0, 0] * 255).round().long()
    assert set(cls.unique().tolist()) == {0, 1, 2, 3}


def test_n_way_larger_than_classes() -> None:
    with pytest.raises(DatasetError, match="n_way=9 but the data has only 7 classes"):
        FewShotTasks(_classes(), 9, 1, 1)


def test_class_with_too_few_images_is_named() -> None:
    with pytest.raises(DatasetError, match=r"'c0' \(6\).*fewer"):
        FewShotTasks(_classes(), 2, 3, 4)


@pytest.mark.parametrize("bad", [{"n_way": 0}, {"shots": -1}, {"queries": 0}])
def test_non_positive_sizes(bad: dict[str, int]) -> None:
    kwargs = {"n_way": 2, "shots": 1, "queries": 1, **bad}
    with pytest.raises(ValueError, match="must be an int > 0"):
        FewShotTasks(_classes(), **kwargs)


def test_load_image_folder(image_folder: Path) -> None:
    data = load_image_folder(image_folder)
    assert data.images.shape == (30, 3, 12, 12) and data.num_classes == 6
    assert data.names[0] == "class_00"
    small = load_image_folder(image_folder, image_size=8)
    assert small.image_shape == (3, 8, 8)
    xs, _ys, _xq, _yq = FewShotTasks(data, 5, 1, 3, seed=0).sample(2)
    assert xs.shape == (2, 5, 3, 12, 12) and float(xs.max()) <= 1.0


def test_folder_errors(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    bad = image_folder / "class_03" / "img_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"cannot decode image .*img_1\.png"):
        load_image_folder(image_folder)
    bad.unlink()
    from PIL import Image

    Image.new("RGB", (20, 20)).save(image_folder / "class_00" / "big.png")
    with pytest.raises(DatasetError, match="image_size"):
        load_image_folder(image_folder)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="at least 2 classes"):
        load_image_folder(tmp_path / "flat")


def test_rotations_make_new_classes() -> None:
    data = _classes(3, 4)
    rot = data.with_rotations((0, 90, 180, 270))
    assert rot.num_classes == 12 and rot.names[3] == "c0@rot90"
    first_rot = rot.images[rot.targets == 3][0]
    assert torch.equal(first_rot, torch.rot90(data.images[0], 1, (1, 2)))
    with pytest.raises(ValueError, match="multiples of 90"):
        data.with_rotations((0, 45))
