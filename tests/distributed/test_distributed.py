"""Distributed meta-gradients (gloo, 2 CPU processes, 1 thread each) equal single-process ones."""

from __future__ import annotations

import datetime
import itertools
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad.distributed import check_same_config, distributed_meta_loss, shard_bounds

D = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(D)


def _batch(T: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(T, 1, 1, generator=g, dtype=D) * 4.9 + 0.1
    x = torch.rand(T, 10, 1, generator=g, dtype=D) * 10 - 5
    y = amp * torch.sin(x)
    return x[:, :5], y[:, :5], x[:, 5:], y[:, 5:]


def _train(loss_of, steps: int, T: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    model = _model()
    learner = mg.MAML(model, F.mse_loss, 0.05, 2)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    grads0 = None
    for it in range(steps):
        opt.zero_grad()
        loss_of(learner, *_batch(T, 100 + it)).backward()
        if it == 0:
            grads0 = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        opt.step()
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"grad0.{n}": g for n, g in (grads0 or {}).items()})
    return out


def _worker(rank: int, world: int, init: str, out_dir: str, T: int, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        if mode == "train":
            res = _train(distributed_meta_loss, 20, T)
            torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        elif mode == "config":
            try:
                check_same_config({"lr": 0.1 if rank == 0 else 0.2})
            except RuntimeError as err:
                Path(out_dir, f"rank{rank}.err").write_text(str(err))
        elif mode in ("skip", "raise"):
            _nan_run(rank, out_dir, T, mode)
        elif mode == "sigint":
            _sigint_run(rank, out_dir, T)
        elif mode == "dead":
            if rank == 1:
                os._exit(0)  # dies without taking part
            try:
                learner = mg.MAML(_model(), F.mse_loss, 0.05, 1)
                distributed_meta_loss(learner, *_batch(T, 0)).backward()
            except Exception as err:  # any clear error beats a hang
                Path(out_dir, f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}")
    finally:
        if mode != "dead":
            dist.destroy_process_group()
    # Skip interpreter teardown: with torch 2.13 + gloo a finished rank sometimes aborts there
    # ("terminate called without an active exception", no Python frame; 3 in 10 runs on the
    # 2-core EPYC), after its results are written. Errors above still propagate to spawn.
    os._exit(0)


def _poisoned_trainer(T: int, policy: str):  # type: ignore[no-untyped-def]
    """A 4-iteration sinusoid Trainer whose 2nd meta-batch has a NaN in its last task only."""
    from metagrad.training import Trainer, preset

    cfg = preset("sinusoid").replace(
        iterations=4, meta_batch=T, val_every=100, log_every=100, nan_policy=policy
    )
    t = Trainer(cfg, None, progress=False)
    sampler, calls = t.samplers["train"], {"n": 0}
    orig = sampler.sample

    def sample(n: int):  # type: ignore[no-untyped-def]
        batch = orig(n)
        calls["n"] += 1
        if calls["n"] == 2:
            xs = batch.xs.clone()
            xs[T - 1, 0] = float("nan")  # the last task: in rank 1's shard only
            batch = batch._replace(xs=xs)
        return batch

    sampler.sample = sample  # type: ignore[method-assign]
    return t


def _nan_run(rank: int, out_dir: str, T: int, policy: str) -> None:
    t = _poisoned_trainer(T, policy)
    try:
        t.train()
    except mg.NonFiniteError as err:
        Path(out_dir, f"rank{rank}.err").write_text(f"{err.task} {err.step} {err}")
        return
    state = {k: v.detach().clone() for k, v in t.learner.state_dict().items()}
    torch.save({"params": state, "skipped": t.skipped, "iteration": t.iteration},
               Path(out_dir) / f"rank{rank}.pt")  # fmt: skip


def _sigint_run(rank: int, out_dir: str, T: int) -> None:
    """Ctrl-C on rank 1 only, while it samples its 3rd meta-batch."""
    import signal

    from metagrad.training import Trainer, preset

    cfg = preset("sinusoid").replace(iterations=50, meta_batch=T, val_every=100, log_every=100,
                                     checkpoint_every=100)  # fmt: skip
    t = Trainer(cfg, Path(out_dir, "run"), progress=False, writer=rank == 0)
    sampler, calls = t.samplers["train"], {"n": 0}
    orig = sampler.sample

    def sample(n: int):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        batch = orig(n)
        if rank == 1 and calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return batch

    sampler.sample = sample  # type: ignore[method-assign]
    try:
        t.train()
    except KeyboardInterrupt:
        state = {k: v.detach().clone() for k, v in t.learner.state_dict().items()}
        torch.save({"params": state, "iteration": t.iteration}, Path(out_dir) / f"rank{rank}.pt")


def _spawn(T: int, mode: str) -> Path:
    out = Path(tempfile.mkdtemp())
    init = f"file://{out / 'rendezvous'}"
    mp.start_processes(
        _worker, args=(2, init, str(out), T, mode), nprocs=2, join=True, start_method="spawn"
    )
    return out


def test_shard_bounds_cover_every_task_once() -> None:
    for T in range(2, 12):
        for world in range(1, T + 1):
            shards = [shard_bounds(T, r, world) for r in range(world)]
            assert shards[0][0] == 0 and shards[-1][1] == T
            assert all(a[1] == b[0] for a, b in itertools.pairwise(shards))
            sizes = [b - a for a, b in shards]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="world size is 3"):
        shard_bounds(2, 0, 3)


def test_without_process_group_it_is_meta_loss() -> None:
    learner = mg.MAML(_model(), F.mse_loss, 0.05, 1)
    batch = _batch(4, 0)
    assert torch.equal(distributed_meta_loss(learner, *batch), learner.meta_loss(*batch).detach())


@pytest.mark.parametrize("T", [4, 5])  # even and uneven split
def test_two_ranks_equal_single_process(T: int) -> None:
    out = _spawn(T, "train")
    single = _train(lambda ln, *b: ln.meta_loss(*b), 20, T)
    for r in (0, 1):
        got = torch.load(out / f"rank{r}.pt", weights_only=True)
        for k, v in single.items():
            tol = 1e-10 if k.startswith("grad0.") else 1e-6
            assert torch.allclose(got[k], v, rtol=tol, atol=tol * 1e-3), (r, k)


def test_mismatched_configs_are_detected() -> None:
    out = _spawn(4, "config")
    for r in (0, 1):
        assert "configuration that differs" in (out / f"rank{r}.err").read_text()


def test_a_dead_rank_gives_an_error_not_a_hang() -> None:
    out = _spawn(4, "dead")
    assert (out / "rank0.err").exists()


def test_nan_skip_is_collective_replicas_stay_identical() -> None:
    """A NaN in rank 1's shard only: both ranks skip the same meta-batch (issue 24, item 1)."""
    T = 4
    out = _spawn(T, "skip")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1 and r0["iteration"] == r1["iteration"] == 4
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k  # bitwise: the replicas never diverge
    single = _poisoned_trainer(T, "skip")
    single.train()
    assert single.skipped == 1
    for k, v in single.learner.state_dict().items():  # and they follow the single-process run
        assert torch.allclose(r0["params"][k], v, rtol=1e-5, atol=1e-6), k


def test_nan_raise_is_collective_both_ranks_name_the_task() -> None:
    out = _spawn(4, "raise")
    for r in (0, 1):
        task, step, msg = (out / f"rank{r}.err").read_text().split(" ", 2)
        assert (task, step) == ("3", "0"), msg  # the task index in the whole meta-batch


def test_ctrl_c_on_one_rank_stops_all_at_the_same_iteration() -> None:
    out = _spawn(4, "sigint")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["iteration"] == r1["iteration"] == 2  # iteration 3 was rolled back on both
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    from metagrad.training import load_checkpoint

    assert load_checkpoint(out / "run")["iteration"] == 2  # rank 0 saved that state
