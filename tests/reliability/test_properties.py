"""Property-based tests (hypothesis) of the sampler, the config parser and CLI argument handling,
and a simulated disk-full during a checkpoint write."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from metagrad._argtypes import finite_float, xy_pair
from metagrad.cli import build_parser
from metagrad.tasks import FewShotTasks, ImageClasses
from metagrad.training import ConfigError, preset
from metagrad.training._checkpoint import load_checkpoint, save_checkpoint
from metagrad.training._config import validate


def _classes(n: int, per: int) -> ImageClasses:
    imgs = torch.zeros(n * per, 1, 2, 2, dtype=torch.uint8)
    for c in range(n):
        for i in range(per):
            imgs[c * per + i, 0, 0, 0], imgs[c * per + i, 0, 0, 1] = c, i
    return ImageClasses(imgs, torch.arange(n).repeat_interleave(per), [f"c{c}" for c in range(n)])


@settings(max_examples=30, deadline=None)
@given(
    n_classes=st.integers(2, 8), n_way=st.integers(1, 8), k=st.integers(1, 3), q=st.integers(1, 3),
    tasks=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_sampler_properties(
    n_classes: int, n_way: int, k: int, q: int, tasks: int, seed: int
) -> None:
    assume(n_way <= n_classes)
    data = _classes(n_classes, k + q + 1)
    xs, ys, xq, yq = FewShotTasks(data, n_way, k, q, seed=seed).sample(tasks)
    assert ys.min() >= 0 and ys.max() < n_way and yq.min() >= 0 and yq.max() < n_way
    for t in range(tasks):
        assert torch.equal(torch.bincount(ys[t], minlength=n_way), torch.full((n_way,), k))
        assert torch.equal(torch.bincount(yq[t], minlength=n_way), torch.full((n_way,), q))
        cls = (xs[t, :, 0, 0, 0] * 255).round().long()
        for lab in range(n_way):  # one source class per label
            assert len(set(cls[ys[t] == lab].tolist())) == 1
    again = FewShotTasks(data, n_way, k, q, seed=seed).sample(tasks)
    assert all(torch.equal(a, b) for a, b in zip((xs, ys, xq, yq), again))  # deterministic


@settings(max_examples=40, deadline=None)
@given(
    field=st.sampled_from(["inner_lr", "meta_lr", "meta_batch", "iterations", "inner_steps"]),
    value=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not v > 0)),
)  # fmt: skip
def test_config_rejects_non_positive_values(field: str, value: float) -> None:
    # zero inner steps / step size are valid (degenerate: no adaptation)
    assume(not (field in ("inner_steps", "inner_lr") and value == 0))
    with pytest.raises(ConfigError):
        validate(preset("sinusoid").replace(**{field: value}))


@settings(max_examples=50, deadline=None)
@given(
    x=st.floats(allow_nan=False, allow_infinity=False),
    y=st.floats(allow_nan=False, allow_infinity=False),
)
def test_cli_number_arguments_round_trip(x: float, y: float) -> None:
    assert finite_float(repr(x)) == x
    assert xy_pair(f"{x!r},{y!r}") == (x, y)
    args = build_parser().parse_args(["explain", f"--w0={x!r}", f"--support={x!r},{y!r}"])
    assert args.w0 == x and args.support == (x, y)


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=12))
def test_cli_bad_numbers_are_usage_errors(text: str) -> None:
    try:
        value = float(text)
        ok = value == value and abs(value) != float("inf")
    except ValueError:
        ok = False
    assume(not ok)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["explain", f"--w0={text}"])
    assert exc.value.code == 2


def test_disk_full_during_checkpoint_write_keeps_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        real_save(obj, f, *a, **k)  # part of the data lands, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(tmp_path)
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left
