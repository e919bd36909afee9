"""Fault injection: malicious files never run or escape, SIGKILL never loses or changes a run."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from mg_image_fixtures import omniglot_members

from metagrad.tasks._omniglot import read_omniglot_files
from metagrad.training._checkpoint import CheckpointError, load_checkpoint


class _Evil:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_checkpoint_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as fh:  # a plain pickle
        pickle.dump({"format": "x", "payload": _Evil(marker)}, fh)
    torch.save({"payload": _Evil(marker)}, tmp_path / "evil_torch.pt")  # torch's zip format
    for path in (run, tmp_path / "evil_torch.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    assert not marker.exists()


def test_zip_member_with_dotdot_is_read_not_extracted(tmp_path: Path) -> None:
    evil_target = tmp_path / "escaped.png"
    z = tmp_path / "data" / "images_background_small1.zip"
    z.parent.mkdir()
    members = omniglot_members("images_background_small1")
    png = next(iter(members.values()))
    with zipfile.ZipFile(z, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("../../escaped.png", png)
        zf.writestr("images_background_small1/../../../escaped.png", png)
    before = set(tmp_path.rglob("*"))
    chars, _ = read_omniglot_files(z.parent)
    assert not evil_target.exists()
    assert set(tmp_path.rglob("*")) == before  # nothing written anywhere
    assert len(chars) == 8  # the real characters are all there


ARGS = ["train", "sinusoid", "--iterations", "60", "--meta-batch", "4", "--checkpoint-every", "1",
        "--val-every", "1000", "--eval-tasks", "4", "--no-progress", "--no-plots", "--strategy", "loop"]  # fmt: skip


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src)


def _final(run: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run)
    assert state["iteration"] == 60
    return state["learner"]


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    subprocess.run(
        [sys.executable, "-m", "metagrad", *ARGS, "--output", str(ref)],
        env=_env(),
        check=True,
        capture_output=True,
    )
    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        extra = ["--resume"] if attempt else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "metagrad", *ARGS, "--output", str(run), *extra],
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Wait for a checkpoint beyond the start, then kill at a random moment.
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "checkpoint.pt").exists():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        load_checkpoint(run)  # every kill leaves a loadable checkpoint
    subprocess.run(
        [sys.executable, "-m", "metagrad", *ARGS, "--output", str(run), "--resume"],
        env=_env(),
        check=True,
        capture_output=True,
    )
    assert kills >= 1
    a, b = _final(ref), _final(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigint_at_random_moments_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    """Ctrl-C through the real CLI; no periodic checkpoints, so only the SIGINT one counts."""
    args = [*ARGS[:6], "--checkpoint-every", "1000", "--log-every", "1", *ARGS[8:]]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "metagrad", *args, "--output", str(ref)], env=_env(),
                   check=True, capture_output=True)  # fmt: skip
    run, log = tmp_path / "interrupted", tmp_path / "interrupted" / "metrics.csv"
    rng = random.Random(1)
    stops = 0
    for attempt in range(3):
        size = log.stat().st_size if log.exists() else 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "metagrad", *args, "--output", str(run),
             *(["--resume"] if attempt else [])],
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline and (log.stat().st_size if log.exists() else 0) <= size:
            time.sleep(0.01)  # this attempt has logged an iteration: it is in the loop
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        assert proc.returncode in (0, 130), err
        if proc.returncode == 130:
            stops += 1
            assert "interrupted at iteration" in err and "--resume" in err
        if load_checkpoint(run)["iteration"] == 60:
            break
    if load_checkpoint(run)["iteration"] < 60:
        subprocess.run([sys.executable, "-m", "metagrad", *args, "--output", str(run), "--resume"],
                       env=_env(), check=True, capture_output=True)  # fmt: skip
    assert stops >= 1
    a, b = _final(ref), _final(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _poison_second_batch(trainer) -> None:  # type: ignore[no-untyped-def]
    sampler = trainer.samplers["train"]
    orig, calls = sampler.sample, {"n": 0}

    def sample(n: int):  # type: ignore[no-untyped-def]
        batch = orig(n)
        calls["n"] += 1
        if calls["n"] == 2:
            xs = batch.xs.clone()
            xs[1, 0] = float("nan")
            batch = batch._replace(xs=xs)
        return batch

    sampler.sample = sample


def test_nan_raise_policy_names_task_and_keeps_checkpoint_clean(tmp_path: Path) -> None:
    from metagrad import NonFiniteError
    from metagrad.training import Trainer, preset

    cfg = preset("sinusoid").replace(iterations=4, meta_batch=3, checkpoint_every=1, val_every=100)
    t = Trainer(cfg, tmp_path / "run", progress=False)
    _poison_second_batch(t)
    with pytest.raises(NonFiniteError) as exc:
        t.train()
    assert exc.value.task == 1 and exc.value.step == 0
    state = load_checkpoint(tmp_path / "run")
    assert state["iteration"] == 1
    assert all(v.isfinite().all() for v in state["learner"].values() if v.is_floating_point())


def test_nan_skip_policy_drops_the_batch_and_counts_it(tmp_path: Path) -> None:
    from metagrad.training import Trainer, preset

    cfg = preset("sinusoid").replace(
        iterations=4, meta_batch=3, checkpoint_every=1, val_every=100, nan_policy="skip"
    )
    t = Trainer(cfg, tmp_path / "run", progress=False)
    _poison_second_batch(t)
    assert t.train() == 4 and t.skipped == 1
    state = load_checkpoint(tmp_path / "run")
    assert state["skipped"] == 1
    assert all(v.isfinite().all() for v in state["learner"].values() if v.is_floating_point())
