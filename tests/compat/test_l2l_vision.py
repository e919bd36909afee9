"""``l2l.vision``: models with learn2learn's constructors, local Omniglot, ``get_tasksets``."""

from __future__ import annotations

import copy
import doctest
import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mg_l2l_fixtures import CHARACTERS, DRAWERS, distinct_characters, stroke_png
from PIL import Image
from torch.func import functional_call

import metagrad.compat._l2l_vision_data as vision_data_impl
import metagrad.compat._l2l_vision_models as models_impl
import metagrad.compat.learn2learn as l2l
from metagrad.tasks import DatasetError, load_omniglot

M = l2l.vision.models


# -- models -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "shape", "features"),
    [
        (lambda: M.OmniglotFC(28**2, 5), (4, 1, 28, 28), 64),
        (lambda: M.OmniglotFC(28**2, 5, sizes=[32, 16]), (4, 784), 16),
        (lambda: M.OmniglotCNN(5), (4, 1, 28, 28), 64),
        (lambda: M.OmniglotCNN(output_size=20, hidden_size=16, layers=3), (4, 784), 16),
        (lambda: M.CNN4(5, hidden_size=8), (2, 3, 84, 84), 200),
        (lambda: M.MiniImagenetCNN(5, hidden_size=8, layers=2), (2, 3, 84, 84), 200),
        (
            lambda: M.CNN4(5, hidden_size=8, channels=1, max_pool=False, embedding_size=8 * 36),
            (2, 1, 84, 84),
            288,
        ),
    ],
)
def test_models_features_then_classifier(make, shape, features) -> None:  # type: ignore[no-untyped-def]
    model = make()
    x = torch.rand(*shape)
    out = model(x)
    assert out.shape[0] == shape[0] and out.shape[1] == model.classifier.out_features
    assert model.features(x).shape == (shape[0], features)
    assert torch.equal(model.classifier(model.features(x)), out)


def test_model_initializations_follow_learn2learn() -> None:
    fc = M.OmniglotFC(28**2, 5)
    w = fc.classifier.weight.detach()
    assert w.abs().max() <= 0.02 + 1e-7 and 0.004 < float(w.std()) < 0.01  # truncated N(0, .01)
    assert torch.all(fc.classifier.bias == 0)
    cnn = M.OmniglotCNN(5)
    scale = cnn.base[0].normalize.weight.detach()
    assert 0.0 <= float(scale.min()) and float(scale.max()) <= 1.0  # U[0, 1] scales
    assert torch.all(cnn.base[0].conv.bias == 0)
    assert float(cnn.classifier.weight.detach().std()) > 0.5  # N(0, 1)
    assert cnn.base[0].conv.stride == (2, 2) and isinstance(cnn.base[0].max_pool, torch.nn.Identity)
    cnn4 = M.CNN4(5, hidden_size=8)
    assert cnn4.features[0].conv.stride == (1, 1) and cnn4.classifier.in_features == 200
    assert M.MiniImagenetCNN is M.CNN4


def test_resnet12_shapes_widths_and_eval_identity() -> None:
    torch.manual_seed(0)
    net = M.ResNet12(5).eval()
    x = torch.rand(2, 3, 84, 84)
    assert net.features(x).shape == (2, 640) and net(x).shape == (2, 5)
    narrow = M.ResNet12(5, hidden_size=512, wider=False, channels=1).eval()
    assert narrow(torch.rand(1, 1, 84, 84)).shape == (1, 5)
    flat = M.ResNet12Backbone(avg_pool=False).eval()
    assert flat(x).shape == (2, 640 * 5 * 5)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is None for c in convs)  # 12 + 4 shortcut convs


def test_dropblock_drops_square_blocks_and_rescales() -> None:
    torch.manual_seed(0)
    block = models_impl.DropBlock(block_size=3).train()
    x = torch.ones(2, 4, 9, 9)
    out = block(x, gamma=0.05)
    dropped = out == 0
    assert dropped.any() and (~dropped).any()
    kept = float((~dropped).sum())
    torch.testing.assert_close(out[~dropped], torch.full_like(out[~dropped], x.numel() / kept))
    # Every dropped pixel lies in a fully dropped 3x3 square.
    d = dropped.float().view(-1, 1, 9, 9)
    full_squares = (F.avg_pool2d(d, 3, stride=1) == 1).float()  # top-left corners of 3x3 holes
    union = F.conv_transpose2d(full_squares, torch.ones(1, 1, 3, 3)).view_as(dropped)
    assert torch.equal(union > 0, dropped)
    assert torch.equal(block.eval()(x, gamma=0.5), x)


def test_resnet_block_warms_up_drop_rate() -> None:
    blk = models_impl.BasicBlock(4, 4, stride=1, drop_rate=0.1, drop_block=True, block_size=1)
    x = torch.randn(2, 4, 6, 6)
    blk.train()(x)
    assert blk.num_batches_tracked == 1


def test_second_order_maml_through_vision_models_matches_unrolled_reference() -> None:
    torch.manual_seed(0)
    for model in (M.OmniglotFC(28**2, 3, sizes=[16, 8]).double(), M.OmniglotCNN(3, 8, 2).double()):
        xs, xq = (
            torch.rand(6, 1, 28, 28, dtype=torch.float64),
            torch.rand(6, 1, 28, 28, dtype=torch.float64),
        )
        ys, yq = torch.arange(3).repeat(2), torch.arange(3).repeat(2)
        maml = l2l.algorithms.MAML(model, lr=0.4)
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(xs), ys))
        got = torch.autograd.grad(F.cross_entropy(learner(xq), yq), list(maml.parameters()))
        theta = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
        loss = F.cross_entropy(functional_call(model, theta, (xs,)), ys)
        gs = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        fast = {k: p - 0.4 * g for (k, p), g in zip(theta.items(), gs)}
        want = torch.autograd.grad(
            F.cross_entropy(functional_call(model, fast, (xq,)), yq), list(theta.values())
        )
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# -- FullOmniglot --------------------------------------------------------------------------------
def test_full_omniglot_deduplicates_and_orders_labels(omniglot_root: Path) -> None:
    ds = l2l.vision.datasets.FullOmniglot(root=omniglot_root, download=True)
    n = distinct_characters()
    assert len(ds) == n * DRAWERS and len(ds.characters) == n  # Greek is counted once
    assert len(ds.duplicates) == CHARACTERS and all(a == "Greek" for a, _ in ds.duplicates)
    # Labels: background_small1 (Alpha_Script, Greek), then small2's new alphabet (Beta_Script).
    assert ds.characters[0] == ("Alpha_Script", "character01")
    assert ds.characters[CHARACTERS] == ("Greek", "character01")
    assert ds.characters[-1] == ("Beta_Script", f"character{CHARACTERS:02d}")
    image, label = ds[DRAWERS]  # first drawing of the second character
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (105, 105)
    assert label == 1
    meta = l2l.data.MetaDataset(ds)
    assert meta.labels == list(range(n)) and len(meta.labels_to_indices[5]) == DRAWERS


def test_full_omniglot_transforms_and_torchvision_layout(tmp_path: Path) -> None:
    folder = tmp_path / "omniglot-py" / "images_background" / "Alpha" / "character01"
    folder.mkdir(parents=True)
    for d in (1, 2):
        (folder / f"0101_{d:02d}.png").write_bytes(stroke_png(d))
    ds = l2l.vision.datasets.FullOmniglot(
        tmp_path, transform=lambda im: np.asarray(im).shape, target_transform=lambda y: y + 10
    )
    assert len(ds) == 2 and ds[1] == ((105, 105), 10)
    assert ds._metagrad_labels is None  # labels are read through target_transform then


def test_missing_data_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"never downloads.*images_background\.zip.*omniglot-py"):
        l2l.vision.datasets.FullOmniglot(tmp_path / "nothing", download=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no usable Omniglot data.*never downloads"):
        l2l.vision.benchmarks.get_tasksets("omniglot", root=tmp_path / "empty")


# -- get_tasksets --------------------------------------------------------------------------------
def tasksets(root: Path, **kw):  # type: ignore[no-untyped-def]
    args = dict(train_ways=5, train_samples=2, test_ways=5, test_samples=2, root=root)
    args.update(kw)
    return l2l.vision.benchmarks.get_tasksets("omniglot", **args)


def classes_of(taskset) -> list[int]:  # type: ignore[no-untyped-def]
    return list(taskset.task_transforms[0].filter_labels)


def test_tasks_have_learn2learn_layout(omniglot_root: Path) -> None:
    random.seed(0)
    sets = tasksets(omniglot_root, train_samples=3)
    X, y = sets.train.sample()
    assert X.shape == (15, 1, 28, 28) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(set(y.tolist())) == [0, 1, 2, 3, 4]
    assert all(y[i : i + 3].unique().numel() == 1 for i in range(0, 15, 3))  # blocks per class
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    assert float(X.mean()) < 0.5  # strokes are 1 on a 0 background (inverted)
    Xv, yv = sets.validation.sample()
    assert Xv.shape == (10, 1, 28, 28) and sorted(set(yv.tolist())) == [0, 1, 2, 3, 4]


def test_learn2learn_split_counts_and_disjoint_classes(omniglot_root: Path) -> None:
    random.seed(0)
    sets = tasksets(omniglot_root)
    tr, va, te = (classes_of(s) for s in sets)
    n = distinct_characters()
    assert (len(tr), len(va)) == (round(n * 1100 / 1623), round(n * 100 / 1623))
    assert len(tr) + len(va) + len(te) == n
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    random.seed(0)
    assert classes_of(tasksets(omniglot_root).train) == tr  # the global seed fixes the split
    a = classes_of(tasksets(omniglot_root, split_seed=3).train)
    random.seed(99)
    assert classes_of(tasksets(omniglot_root, split_seed=3).train) == a


def test_metagrad_split_is_the_split_of_metagrad_train(omniglot_root: Path) -> None:
    sets = tasksets(omniglot_root, split="metagrad")
    names = sets.train.dataset.dataset.characters
    ours = {
        s: sorted(names[c] for c in classes_of(t)) for s, t in zip(("train", "val", "test"), sets)
    }
    reference = load_omniglot(omniglot_root, rotations=(0,)).characters
    assert ours == {k: sorted(v) for k, v in reference.items()}


def test_decoding_equals_learn2learns_transform(omniglot_root: Path) -> None:
    decoded = vision_data_impl.DecodedOmniglot(omniglot_root)
    with zipfile.ZipFile(omniglot_root / "images_background_small1.zip") as zf:
        name = sorted(n for n in zf.namelist() if n.endswith(".png"))[0]
        img = Image.open(io.BytesIO(zf.read(name))).convert("L")
    # Resize(28, LANCZOS), ToTensor(), 1 - x
    want = 1.0 - torch.from_numpy(np.array(img.resize((28, 28), Image.Resampling.LANCZOS))) / 255.0
    torch.testing.assert_close(decoded[0][0][0], want.float(), atol=1e-6, rtol=0)


def test_class_rotation_is_one_angle_per_class() -> None:
    images = torch.rand(12, 1, 5, 5)
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, torch.arange(4).repeat(3)))
    rot = l2l.vision.transforms.RandomClassRotation(meta, [0, 90, 180, 270])
    mixed = 0
    for _ in range(20):
        desc = l2l.data.transforms.FusedNWaysKShots(meta, n=4, k=3)(None)
        plain = copy.deepcopy(desc)
        tasks = l2l.data.TaskDataset(meta)
        Xr, y = tasks.get_task(rot(l2l.data.transforms.LoadData(meta)(desc)))
        X0, _ = tasks.get_task(l2l.data.transforms.LoadData(meta)(plain))
        angles = {}
        for a, b, lab in zip(Xr, X0, y.tolist()):
            k = [j for j in range(4) if torch.equal(torch.rot90(b, j, dims=(-2, -1)), a)]
            assert len(k) == 1
            assert angles.setdefault(lab, k[0]) == k[0]  # same angle for a whole class
        mixed += len(set(angles.values())) > 1
    assert mixed > 0  # classes of one task get different angles


def test_rotation_of_other_angles_and_pil_images() -> None:
    x = torch.rand(2, 1, 8, 8)
    for deg in (90, 180, 270, -90):
        near = vision_data_impl.rotate(x, deg + 1e-7)  # the sampling path, not rot90
        assert torch.equal(near, torch.rot90(x, round(deg / 90) % 4, dims=(-2, -1)))
    arr = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    assert (np.asarray(vision_data_impl.rotate(Image.fromarray(arr), 90)) == np.rot90(arr)).all()
    half = vision_data_impl.rotate(torch.ones(1, 9, 9), 45)
    assert float(half[0, 4, 4]) == 1.0 and float(half[0, 0, 0]) == 0.0  # corners fall outside


def test_benchmark_errors_name_the_fix(omniglot_root: Path) -> None:
    with pytest.raises(ValueError, match=r"'mini-imagenet' is not available.*needs a download"):
        l2l.vision.benchmarks.get_tasksets("mini-imagenet", root=omniglot_root)
    with pytest.raises(TypeError, match=r"unknown options \['data_augmentation'\]"):
        tasksets(omniglot_root, data_augmentation="normalize")
    with pytest.raises(ValueError, match=r"validation split has 6 classes.*fewer than 10 ways"):
        tasksets(omniglot_root, test_ways=10)
    with pytest.raises(ValueError, match=r"4 samples per class are needed"):
        tasksets(omniglot_root, train_samples=4)
    assert l2l.vision.benchmarks.list_tasksets() == ("omniglot",)


def test_num_tasks_and_no_rotation_option(omniglot_root: Path) -> None:
    sets = tasksets(omniglot_root, num_tasks=3, rotations=[])
    assert len(sets.train) == 3
    a, b = sets.train[1], sets.train[1]
    assert torch.equal(a[0], b[0])  # cached description, no random rotation


def test_docstring_examples_run() -> None:
    for mod in (models_impl,):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
