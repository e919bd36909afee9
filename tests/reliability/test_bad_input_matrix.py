"""Bad-input kinds not covered elsewhere: out-of-range labels, wrong device, non-image files,
an empty zip. Each must give an error naming the problem and the fix."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad.tasks import DatasetError, load_image_folder
from metagrad.tasks._omniglot import read_omniglot_files


def _clf_tasks(bad_label: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    ys = torch.arange(3).repeat(2, 2)
    yq = ys.clone()
    if bad_label is not None:
        ys[1, 2] = bad_label
    return xs, ys, xq, yq


@pytest.mark.parametrize("strategy", ["loop", "vmap", "hvp_chain"])
@pytest.mark.parametrize("bad", [3, -7])
def test_labels_outside_range(strategy: str, bad: int) -> None:
    learner = mg.MAML(nn.Linear(4, 3), F.cross_entropy, 0.1, 1, strategy=strategy)
    learner.meta_loss(*_clf_tasks())  # in range: fine
    with pytest.raises(
        ValueError,
        match=r"metagrad\.MAML: loss_fn raised (IndexError|RuntimeError).*\[0, number of classes\)",
    ):
        learner.meta_loss(*_clf_tasks(bad))


def test_task_tensors_on_another_device() -> None:
    learner = mg.MAML(nn.Linear(4, 3), F.cross_entropy, 0.1, 1)
    xs, ys, xq, yq = _clf_tasks()
    with pytest.raises(ValueError, match=r"xs is on meta but the model is on cpu.*\.to\('cpu'\)"):
        learner.meta_loss(xs.to("meta"), ys, xq, yq)


def test_non_image_files_in_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    for c in range(3):
        d = tmp_path / f"class{c}"
        d.mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (c * 40, i * 40, 0)).save(d / f"{i}.png")
    (tmp_path / "class0" / "notes.txt").write_text("not an image")
    (tmp_path / "class1" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "class1" / "broken.png").unlink()
    data = load_image_folder(tmp_path)  # the .txt file is not an image: ignored
    assert data.num_classes == 3 and len(data.targets) == 9


def test_empty_zip(tmp_path: Path) -> None:
    z = tmp_path / "images_background_small1.zip"
    with zipfile.ZipFile(z, "w"):
        pass
    with pytest.raises(DatasetError, match="not Omniglot-shaped"):
        read_omniglot_files(z)
