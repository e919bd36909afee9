"""Ctrl-C (SIGINT) at random moments, then resume: bitwise the run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from metagrad.training import TrainConfig, Trainer, preset

CFG = preset("sinusoid").replace(
    iterations=30, meta_batch=3, val_every=10, val_tasks=3, log_every=5, checkpoint_every=1000,
    eval_tasks=3, test_steps=[0, 1],
)  # fmt: skip
# Where in a meta-iteration the signal lands: after the batch is drawn (the case that lost a
# batch), inside the meta-gradient, inside the optimizer update, inside validation.
PHASES = ("sample", "meta_loss", "optimizer", "validate")
# Iterations are drawn at random (seeded by the case, so a failure is reproducible).


def _params(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.learner.state_dict().items()}


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _arm(t: Trainer, at: int, phase: str, times: int) -> None:
    """Send ``times`` SIGINTs to this process in ``phase`` of meta-iteration ``at`` (1-based)."""

    def wrap(obj: Any, name: str, when: str) -> None:
        real = getattr(obj, name)

        def fire(*a: Any, **k: Any) -> Any:
            if t.iteration == (at if phase == "validate" else at - 1):
                if when == "before":
                    for _ in range(times):
                        _sigint()
                out = real(*a, **k)
                if when == "after":
                    for _ in range(times):
                        _sigint()
                return out
            return real(*a, **k)

        setattr(obj, name, fire)

    if phase == "sample":
        wrap(t.samplers["train"], "sample", "after")
    elif phase == "meta_loss":
        wrap(t.learner, "meta_result", "after")
    elif phase == "optimizer":
        wrap(t.optimizer, "step", "before")
    else:
        wrap(t, "validate", "before")


def _interrupted_run(
    cfg: TrainConfig, out: Path, stops: list[tuple[int, str]], times: int
) -> Trainer:
    t = Trainer(cfg, out, progress=False)
    for at, phase in stops:
        _arm(t, at, phase, times)
        with pytest.raises(KeyboardInterrupt):
            t.train()
        t = Trainer(cfg, out, resume=True, progress=False)
    assert t.train() == cfg.iterations
    return t


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("times", [1, 2])  # one Ctrl-C: after the iteration; two: at once
@pytest.mark.parametrize("phases", [PHASES[:2], PHASES[2:]])
def test_sigint_at_random_moments_then_resume_is_bitwise(
    tmp_path: Path, phases: tuple[str, str], times: int
) -> None:
    rng = random.Random(f"{phases}{times}")
    first = rng.randrange(1, CFG.iterations // 2)
    second = rng.randrange(CFG.iterations // 2 + 1, CFG.iterations)
    if phases[1] == "validate":  # validation runs at multiples of val_every only
        second = 2 * CFG.val_every
    stops = [(first, phases[0]), (second, phases[1])]
    ref = Trainer(CFG, tmp_path / "ref", progress=False)
    ref.train()
    got = _interrupted_run(CFG, tmp_path / "run", stops, times)
    a, b = _params(ref), _params(got)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (stops, k)
    assert got.skipped == 0


def test_one_sigint_finishes_the_iteration_under_way(tmp_path: Path) -> None:
    t = Trainer(CFG, tmp_path, progress=False)
    _arm(t, 7, "sample", 1)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert Trainer(CFG, tmp_path, resume=True, progress=False).iteration == 7
    t = Trainer(CFG, tmp_path, resume=True, progress=False)
    _arm(t, 12, "sample", 2)  # a second Ctrl-C: at once, iteration 12 never happened
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert Trainer(CFG, tmp_path, resume=True, progress=False).iteration == 11


def test_sigint_handler_is_restored(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    Trainer(CFG.replace(iterations=2), tmp_path, progress=False).train()
    assert signal.getsignal(signal.SIGINT) is before
