"""Damaged, planted, missing and half-written checkpoints; disk full while training."""

from __future__ import annotations

import argparse
import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mg_cli import run_cli

from metagrad.training import CheckpointError, TrainConfig, Trainer, load_checkpoint
from metagrad.training._checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    OutputWriteError,
    clean_stale_temp_files,
    save_checkpoint,
)
from metagrad.training._trainer import prepare_output

VALUE = 1.2345  # a weight whose bytes are easy to find in the file


def _state(it: int) -> dict[str, object]:
    return {"iteration": it, "learner": {"w": torch.full((64,), VALUE + it)}}


def _two(tmp_path: Path) -> Path:
    save_checkpoint(_state(1), tmp_path)
    save_checkpoint(_state(2), tmp_path)
    return tmp_path


def _cli(argv: list[str]) -> int:
    return run_cli(argv)


def _flip_a_weight_byte(path: Path, value: float) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<f", value) * 64)
    assert at > 0
    data[at + 2] ^= 0x40  # one bit in one float of the tensor data
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_detected_and_prev_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _two(tmp_path)
    _flip_a_weight_byte(run / CHECKPOINT, VALUE + 2)
    # torch itself loads the damaged file without complaint:
    assert torch.load(run / CHECKPOINT, weights_only=True)["iteration"] == 2
    state = load_checkpoint(run)
    assert state["iteration"] == 1
    assert "checksum does not match" in caplog.text and PREVIOUS in caplog.text
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(run / CHECKPOINT)
    msg = str(exc.value)
    assert "checksum does not match" in msg and "intact (iteration 1)" in msg and PREVIOUS in msg


def test_planted_pickle_is_refused_without_pytorchs_advice(tmp_path: Path) -> None:
    # any pickled object that is not a tensor or a plain container
    torch.save(
        {"format": "metagrad-checkpoint/1", "x": argparse.Namespace(a=1)}, tmp_path / "evil.pt"
    )
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "evil.pt")
    msg = str(exc.value)
    assert "not a plain weights file" in msg
    assert "weights_only set to False" not in msg and "re-running" not in msg.lower()


def test_truncated_file_path_names_the_intact_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _two(tmp_path)
    data = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(run / CHECKPOINT)
    msg = str(exc.value)
    assert "truncated or corrupt" in msg and "Errno" not in msg
    assert f"{run / PREVIOUS}' beside it is intact (iteration 1)" in msg
    assert load_checkpoint(run)["iteration"] == 1  # the folder falls back, and says so
    assert "truncated" in caplog.text and "iteration 1" in caplog.text


def test_missing_latest_with_prev_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _two(tmp_path)
    (run / CHECKPOINT).unlink()
    assert load_checkpoint(run)["iteration"] == 1
    assert "checkpoint.pt' is missing; using the last good checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match=r"does not exist \(checkpoint.prev.pt lies beside"):
        load_checkpoint(run / CHECKPOINT)


def test_nan_parameters_are_an_error_not_a_diverged_evaluation(
    tmp_path: Path, tiny_sinusoid: TrainConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    t = Trainer(tiny_sinusoid.replace(iterations=2), tmp_path / "run", progress=False)
    t.train()
    state = t.state_dict()
    state["learner"] = {k: v.clone() for k, v in state["learner"].items()}
    state["learner"]["module.0.weight"].fill_(float("nan"))
    (tmp_path / "nan").mkdir()
    save_checkpoint(state, tmp_path / "nan")  # a valid checksum: only the values are wrong
    with pytest.raises(CheckpointError, match=r"NaN/Inf parameters \('module.0.weight'\)"):
        load_checkpoint(tmp_path / "nan" / CHECKPOINT)
    capsys.readouterr()
    assert _cli(["eval", str(tmp_path / "nan"), "--tasks", "3"]) == 2
    err = capsys.readouterr()
    assert "diverged" not in err.out
    line = err.err.strip().splitlines()[-1]
    assert line.startswith("metagrad eval: error: no usable checkpoint") and "NaN/Inf" in line


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_are_cleaned_live_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="metagrad")
    run = _two(tmp_path)
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / f".{CHECKPOINT}.tmp-{dead}").write_bytes(b"PK half written")
        (run / f".results.json.tmp-{dead}").write_text("{")
        (run / f".{CHECKPOINT}.tmp-{live.pid}").write_bytes(b"being written")
        prepare_output(run, resume=True)
        left = sorted(p.name for p in run.iterdir())
        assert left == sorted([f".{CHECKPOINT}.tmp-{live.pid}", CHECKPOINT, PREVIOUS])
        assert "removed the stale temporary file" in caplog.text
    finally:
        live.kill()
        live.wait()


def test_complete_temp_file_of_a_kill_between_renames_is_recovered(tmp_path: Path) -> None:
    run = _two(tmp_path)  # kill between os.replace(latest, prev) and os.replace(tmp, latest):
    (tmp_path / "elsewhere").mkdir()
    save_checkpoint(_state(3), tmp_path / "elsewhere")
    os.replace(run / CHECKPOINT, run / PREVIOUS)
    dead = _dead_pid()
    os.replace(tmp_path / "elsewhere" / CHECKPOINT, run / f".{CHECKPOINT}.tmp-{dead}")
    assert clean_stale_temp_files(run) == [run / CHECKPOINT]
    assert load_checkpoint(run)["iteration"] == 3


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_mid_run_says_what_is_safe_and_resumes(
    tmp_path: Path, tiny_sinusoid: TrainConfig, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    cfg = tiny_sinusoid.replace(iterations=6, checkpoint_every=2)
    ref = Trainer(cfg, tmp_path / "ref", progress=False)
    ref.train()
    real, calls = torch.save, {"n": 0}

    def failing(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] >= 2:
            real(obj, f, *a, **k)  # part of the file lands, then the device refuses
            raise OSError(code, os.strerror(code))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    run = tmp_path / "run"
    t = Trainer(cfg, run, progress=False)
    with pytest.raises(OutputWriteError) as exc:
        t.train()
    msg = str(exc.value)
    assert f"checkpoint of iteration 4 to '{run / CHECKPOINT}'" in msg
    assert f"errno {code}" in msg and "safely holds iteration 2" in msg
    assert f"--resume --output {run}" in msg and exc.value.errno == code
    monkeypatch.setattr(torch, "save", real)
    resumed = Trainer(cfg, run, resume=True, progress=False)
    assert resumed.iteration == 2 and resumed.train() == 6
    a, b = ref.learner.state_dict(), resumed.learner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_disk_full_in_the_log_and_via_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    real = csv.DictWriter.writerow
    calls = {"n": 0}

    def writerow(self, row):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 3:  # the header and the rows of iterations 1 and 2 are written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", writerow)
    out = tmp_path / "run"
    argv = ["train", "sinusoid", "--iterations", "6", "--meta-batch", "2", "--log-every", "1",
            "--checkpoint-every", "1", "--eval-tasks", "2", "--no-progress", "--no-plots",
            "--output", str(out)]  # fmt: skip
    assert _cli(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("metagrad train: error: could not append the log row of iteration 3")
    assert "metrics.csv" in line and "safely holds iteration 2" in line and "--resume" in line
