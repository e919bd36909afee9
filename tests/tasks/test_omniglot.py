"""Omniglot from zips: layout, de-duplication before the split, no train/test leak, errors."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from mg_image_fixtures import distinct_characters, omniglot_members

from metagrad.tasks import (
    DatasetError,
    FewShotTasks,
    ImageClasses,
    keep_fraction,
    load_omniglot,
    read_omniglot_files,
)

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot"


def _hashes(data: ImageClasses) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in data.images}


def test_reads_zips_deduplicates_and_splits(omniglot_zips: Path) -> None:
    chars, dups = read_omniglot_files(omniglot_zips)
    assert len(chars) == distinct_characters() == 16
    assert sorted(dups) == [("Greek", f"character{c:02d}") for c in range(1, 5)]
    s = load_omniglot(omniglot_zips, split=(0.5, 0.25, 0.25), rotations=(0,))
    assert (s.train.num_classes, s.val.num_classes, s.test.num_classes) == (8, 4, 4)
    keys = [set(v) for v in s.characters.values()]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    # No test character's image appears in training (the duplicate-alphabet trap).
    assert not (_hashes(s.test) & _hashes(s.train))
    assert not (_hashes(s.val) & _hashes(s.train))
    assert s.train.images.shape[1:] == (1, 28, 28)
    # inverted: background 0, strokes 1 (after scaling)
    x = s.train.images.float() / 255
    assert float(x.mean()) < 0.3 and float(x.max()) > 0.9


def test_split_is_fixed_by_split_seed(omniglot_zips: Path) -> None:
    a = load_omniglot(omniglot_zips, split=(0.5, 0.25, 0.25), rotations=(0,), image_size=8)
    b = load_omniglot(omniglot_zips, split=(0.5, 0.25, 0.25), rotations=(0,), image_size=8)
    c = load_omniglot(
        omniglot_zips, split=(0.5, 0.25, 0.25), rotations=(0,), image_size=8, split_seed=1
    )
    assert a.characters == b.characters and a.characters != c.characters
    assert torch.equal(a.test.images, b.test.images)


def test_single_zip_and_extracted_folder_agree(omniglot_zips: Path, tmp_path: Path) -> None:
    one = omniglot_zips / "images_background_small1.zip"
    chars, dups = read_omniglot_files(one)
    assert len(chars) == 8 and not dups
    ext = tmp_path / "extracted"
    for name, data in omniglot_members("images_background_small1").items():
        p = ext / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    chars2, _ = read_omniglot_files(ext)
    assert sorted(chars2) == sorted(chars)
    assert [d for _, d in chars2[("Greek", "character01")]] == [
        d for _, d in chars[("Greek", "character01")]
    ]


def test_rotations_quadruple_classes(omniglot_zips: Path) -> None:
    s = load_omniglot(omniglot_zips, split=(0.5, 0.25, 0.25), image_size=8)
    assert s.train.num_classes == 32
    xs, _ys, _, _ = FewShotTasks(s.train, 5, 1, 2, seed=0).sample(3)
    assert xs.shape == (3, 5, 1, 8, 8)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist.*--data"):
        load_omniglot(tmp_path / "missing.zip")


def test_zip_that_is_not_omniglot_shaped(tmp_path: Path) -> None:
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hello")
        zf.writestr("flat.png", b"")
    with pytest.raises(DatasetError, match="not Omniglot-shaped"):
        load_omniglot(z)
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("not a zip")
    with pytest.raises(DatasetError, match="not a zip"):
        load_omniglot(not_zip)


def test_corrupt_png_in_zip_is_named(tmp_path: Path) -> None:
    z = tmp_path / "images_background_small1.zip"
    members = omniglot_members("images_background_small1")
    bad = sorted(members)[3]
    with zipfile.ZipFile(z, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data[:40] if name == bad else data)
    with pytest.raises(DatasetError, match=f"cannot decode image .*{Path(bad).name}"):
        load_omniglot(z, split=(0.5, 0.25, 0.25))


def test_empty_split_and_bad_size(omniglot_zips: Path) -> None:
    with pytest.raises(DatasetError, match="val split has no character"):
        load_omniglot(omniglot_zips, split=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="image_size=0"):
        load_omniglot(omniglot_zips, image_size=0)


@pytest.mark.skipif(not REAL.is_dir(), reason="real Omniglot data not present at ../shared")
def test_real_background_small_sets_have_242_characters_and_no_leak(tmp_path: Path) -> None:
    chars, dups = read_omniglot_files(REAL)
    assert len(chars) == 242 and len(dups) == 50
    assert {a for a, _ in dups} == {"Greek", "Latin"}
    from metagrad.tasks._omniglot import split_characters

    parts = split_characters(list(chars), (0.7, 0.1, 0.2), 0)
    train = {hashlib.sha1(d).hexdigest() for k in parts["train"] for _, d in chars[k]}
    test = {hashlib.sha1(d).hexdigest() for k in parts["test"] for _, d in chars[k]}
    assert train.isdisjoint(test)
    assert sum(len(v) for v in parts.values()) == 242


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason="real Omniglot data not present at ../shared")
def test_real_decoded_splits_do_not_leak() -> None:
    s = load_omniglot(REAL, rotations=(0,))
    assert s.train.num_classes + s.val.num_classes + s.test.num_classes == 242
    assert not (_hashes(s.test) & _hashes(s.train))


def test_train_fraction_keeps_nested_character_subsets(omniglot_zips: Path) -> None:
    kw = dict(split=(0.5, 0.25, 0.25), image_size=8)
    full = load_omniglot(omniglot_zips, **kw)
    half = load_omniglot(omniglot_zips, train_fraction=0.5, **kw)
    quarter = load_omniglot(omniglot_zips, train_fraction=0.25, **kw)
    # 8 training characters -> 4 -> 2, each with its 4 rotations; val/test untouched.
    assert [len(s.characters["train"]) for s in (full, half, quarter)] == [8, 4, 2]
    assert (half.train.num_classes, quarter.train.num_classes) == (16, 8)
    assert set(quarter.characters["train"]) <= set(half.characters["train"])
    assert set(half.characters["train"]) <= set(full.characters["train"])
    for s in (half, quarter):
        assert s.characters["val"] == full.characters["val"]
        assert s.characters["test"] == full.characters["test"]
        assert torch.equal(s.test.images, full.test.images)
        assert _hashes(s.train) <= _hashes(full.train)


def test_keep_fraction_errors_name_the_fix() -> None:
    assert keep_fraction([1, 2, 3], 1.0, 0) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"keep_fraction: fraction=0 must be in \(0, 1\]"):
        keep_fraction([1, 2, 3], 0, 0)
    with pytest.raises(
        ValueError, match=r"fraction=0.1 of 3 items keeps none. Fix: use a fraction >= 0.333"
    ):
        keep_fraction([1, 2, 3], 0.1, 0)
