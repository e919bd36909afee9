"""Crash-safe checkpoints that load with ``torch.load(weights_only=True)``.

Writing goes to a temporary file in the same folder, is flushed and fsynced, then
``os.replace``\\ d over the target; the previous good checkpoint is kept as ``*.prev.pt``.
Only tensors and plain Python containers are stored (RNG states included), so loading never
unpickles arbitrary objects. Each file carries a SHA-256 of its contents (every tensor's bytes,
dtype and shape, and every plain value), verified on load: a run folder whose latest file is
corrupt, truncated, refused or holds NaN/Inf parameters falls back to ``checkpoint.prev.pt``
with a warning naming both files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "metagrad-checkpoint/1"
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


_log = logging.getLogger("metagrad")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from another model / algorithm / run."""


class OutputWriteError(OSError):
    """Writing a run's checkpoint or log failed (disk full, read-only...): the message names the
    file, the iteration safely on disk and how to resume. ``errno`` is the system's."""


class _Unusable(Exception):
    """Why one checkpoint file cannot be used (the message is the reason, for one line)."""


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 over every tensor (path, dtype, shape, bytes) and plain value of ``state``.

    The ``"checksum"`` key itself is left out; lists and tuples hash alike (a round trip
    through ``torch.save`` may turn one into the other).
    """
    h = hashlib.sha256()

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                try:
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                except (RuntimeError, TypeError):  # pragma: no cover - exotic dtypes
                    h.update(repr(t.tolist()).encode())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
                if not (path == "" and k == "checksum"):
                    walk(obj[k], f"{path}/{k!r}")
        elif isinstance(obj, (list, tuple)):
            h.update(f"{path}|seq{len(obj)}|".encode())
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        else:
            h.update(f"{path}={obj!r}|".encode())

    walk(state, "")
    return h.hexdigest()


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
    The file carries :func:`checksum` of its contents, verified by :func:`load_checkpoint`.
    """
    folder = Path(folder)
    target, prev = folder / CHECKPOINT, folder / PREVIOUS
    tmp = folder / f".{CHECKPOINT}.tmp-{os.getpid()}"
    full = {"format": FORMAT, **state}
    full["checksum"] = checksum(full)
    try:
        with open(tmp, "wb") as f:
            torch.save(full, f)
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]


def _read(path: Path) -> dict[str, Any]:
    """One checkpoint file, weights only, verified; raises _Unusable naming the reason."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            # PyTorch's advice (retry with weights_only=False) would run code from the file.
            raise _Unusable(
                "refused: it is not a plain weights file (it holds pickled Python objects, and "
                "checkpoints are loaded with weights_only=True so that no code in a file runs)"
            ) from None
        raise _Unusable(f"truncated or corrupt ({_first_line(err)})") from None
    except Exception as err:  # zip / OS errors of many types for truncated or damaged files
        msg = _first_line(err)
        if "weights_only" in msg:  # never pass on the advice to disable weights_only
            msg = type(err).__name__
        raise _Unusable(f"truncated or corrupt, cannot be read ({msg})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _Unusable("not a metagrad training checkpoint (written by `metagrad train`)")
    if "checksum" in state and state["checksum"] != checksum(state):
        raise _Unusable(
            "its checksum does not match its contents (the bytes changed after it was written: "
            "disk or copy corruption, or an edit)"
        )
    learner = state.get("learner")
    if isinstance(learner, dict):
        bad = [
            k
            for k, v in learner.items()
            if isinstance(v, torch.Tensor)
            and v.is_floating_point()
            and not bool(v.isfinite().all())
        ]
        if bad:
            raise _Unusable(f"it holds NaN/Inf parameters ({', '.join(map(repr, bad[:3]))})")
    return state


def _iteration(state: dict[str, Any]) -> str:
    it = state.get("iteration")
    return f"iteration {it}" if it is not None else "unknown iteration"


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file (or the ``checkpoint.pt`` of a run folder), weights only, verified.

    A run folder falls back to ``checkpoint.prev.pt`` (logging a warning that names the file
    used and why) when its latest checkpoint is missing, truncated, corrupt (checksum), refused
    (not a plain weights file) or holds NaN/Inf parameters. A file named directly is used as is
    or refused, with a hint when an intact ``checkpoint.prev.pt`` lies beside it.

    Raises:
        CheckpointError: no such file, or no usable checkpoint (each reason named).
    """
    p = Path(path)
    if p.is_dir():
        latest, prev = p / CHECKPOINT, p / PREVIOUS
        if not latest.exists() and not prev.exists():
            raise CheckpointError(
                f"no checkpoint in {str(p)!r} (expected {CHECKPOINT}); train first with "
                f"`metagrad train ... --output {p}`."
            )
        problems: list[str] = []
        for c in (latest, prev):
            if not c.exists():
                problems.append(f"{str(c)!r} is missing")
                continue
            try:
                state = _read(c)
            except _Unusable as why:
                problems.append(f"{str(c)!r}: {why}")
                continue
            if problems:
                _log.warning(
                    "%s; using the last good checkpoint %r (%s) instead.",
                    problems[0], str(c), _iteration(state),
                )  # fmt: skip
            return state
        raise CheckpointError(
            f"no usable checkpoint in {str(p)!r}: {'; '.join(problems)}. Fix: restore the run "
            f"folder from a backup, or start the run again with --overwrite."
        )
    if not p.exists():
        hint = ""
        if p.name == CHECKPOINT and (p.parent / PREVIOUS).exists():
            hint = f" ({PREVIOUS} lies beside it: pass the run folder {str(p.parent)!r} to use it)"
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist{hint}.")
    try:
        return _read(p)
    except _Unusable as why:
        reason = str(why)
    hint = " Fix: use another checkpoint."
    sibling = p.parent / PREVIOUS
    if sibling.exists() and sibling.resolve() != p.resolve():
        try:
            hint = (
                f" Fix: {str(sibling)!r} beside it is intact ({_iteration(_read(sibling))}): "
                f"pass that file, or the run folder {str(p.parent)!r}, which falls back to it."
            )
        except _Unusable:
            pass
    raise CheckpointError(f"cannot use checkpoint {str(p)!r}: {reason}.{hint}")


_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<file>.tmp-PID`` files left by writers that died (their PID is not running).

    A complete, verified ``.checkpoint.pt.tmp-PID`` whose ``checkpoint.pt`` is missing (a kill
    between the two renames of :func:`save_checkpoint`) is the newest checkpoint: it is moved
    into place instead. Returns the files removed or recovered.
    """
    folder = Path(folder)
    done = []
    for f in sorted(folder.glob(".*.tmp-*")):
        m = _TEMP.fullmatch(f.name)
        if m is None or not f.is_file() or _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["name"] == CHECKPOINT and not target.exists():
            try:
                state = _read(f)
            except _Unusable:
                state = None
            if state is not None and "checksum" in state:
                os.replace(f, target)
                _log.warning(
                    "recovered %r (%s) from %r, written completely by process %s before it died.",
                    str(target), _iteration(state), f.name, m["pid"],
                )  # fmt: skip
                done.append(target)
                continue
        try:
            f.unlink()
        except OSError:
            continue
        _log.info("removed the stale temporary file %r (process %s is gone).", str(f), m["pid"])
        done.append(f)
    return done
