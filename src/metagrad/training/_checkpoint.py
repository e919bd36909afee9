"""Crash-safe checkpoints that load with ``torch.load(weights_only=True)``.

Writing goes to a temporary file in the same folder, is flushed and fsynced, then
``os.replace``\\ d over the target; the previous good checkpoint is kept as ``*.prev.pt``.
Only tensors and plain Python containers are stored (RNG states included), so loading never
unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "metagrad-checkpoint/1"
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from another model / algorithm / run."""


def rng_state() -> dict[str, Any]:
    """Global RNG states of torch, numpy and ``random`` as tensors and plain lists."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True always returns the tuple form
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Atomically write ``folder/checkpoint.pt``; the old one becomes ``checkpoint.prev.pt``.

    A crash at any point leaves either the new checkpoint or the previous one (or both) intact.
    """
    folder = Path(folder)
    target, prev = folder / CHECKPOINT, folder / PREVIOUS
    tmp = folder / f".{CHECKPOINT}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            os.replace(target, prev)
        os.replace(tmp, target)
        _fsync_dir(folder)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file (or the ``checkpoint.pt`` of a run folder), weights only.

    Falls back to ``checkpoint.prev.pt`` when a run folder's latest checkpoint is missing or
    truncated (a crash while saving).

    Raises:
        CheckpointError: no such file, or not a metagrad checkpoint.
    """
    p = Path(path)
    candidates = [p / CHECKPOINT, p / PREVIOUS] if p.is_dir() else [p]
    if p.is_dir() and not any(c.exists() for c in candidates):
        raise CheckpointError(
            f"no checkpoint in {str(p)!r} (expected {CHECKPOINT}); train first with "
            f"`metagrad train ... --output {p}`."
        )
    if not p.is_dir() and not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist.")
    errors = []
    for c in candidates:
        if not c.exists():
            continue
        try:
            state = torch.load(c, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling/zip errors of many types
            errors.append(
                f"{c}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            )
            continue
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(
                f"{str(c)!r} is not a metagrad training checkpoint (written by `metagrad train`)."
            )
        if errors:  # the latest was unreadable (crash while saving): say which one is used
            print(
                f"metagrad: warning: {errors[0]}; using the last good checkpoint {str(c)!r}.",
                file=sys.stderr,
            )
        return state
    raise CheckpointError(f"cannot read checkpoint: {'; '.join(errors)}")
