"""A hung (SIGSTOP'd) rank: its peer stops within --dist-timeout with a clear error, not gloo's
300 s; and the float32 drift of 2 ranks against one process, measured (slow)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch

TIMEOUT_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli_rank(rank: int, port: int, out: str, argv: list[str]) -> None:
    """One torchrun-like rank running `metagrad train`; stderr and the exit code to files."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    err = os.open(Path(out, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    from metagrad.cli import main

    code = main(argv)
    Path(out, f"rank{rank}.code").write_text(str(code))
    os._exit(code)  # skip gloo's interpreter teardown (see test_distributed.py)


def test_a_hung_rank_stops_its_peer_within_the_timeout() -> None:
    out = Path(tempfile.mkdtemp())
    run = out / "run"
    argv = ["train", "sinusoid", "--iterations", "100000", "--meta-batch", "4",
            "--checkpoint-every", "5", "--val-every", "100000", "--log-every", "100000",
            "--no-progress", "--no-plots", "--output", str(run),
            "--dist-timeout", str(TIMEOUT_S)]  # fmt: skip
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_cli_rank, args=(r, port, str(out), argv)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoint.pt").exists():
            assert all(p.is_alive() for p in procs), "a rank ended before training"
            time.sleep(0.05)
        assert (run / "checkpoint.pt").exists()
        pid = procs[1].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # hung, not dead: its sockets stay open
        stopped = time.time()
        procs[0].join(timeout=TIMEOUT_S + 60)  # gloo's default would be 300 s
        waited = time.time() - stopped
        assert procs[0].exitcode is not None, f"rank 0 still waiting after {waited:.0f} s"
    finally:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
            p.join()
    assert procs[0].exitcode == 2
    lines = (out / "rank0.stderr").read_text().strip().splitlines()
    assert lines[-1].startswith("metagrad train: error: metagrad.distributed: rank 0 stopped in ")
    assert f"did not take part within {TIMEOUT_S:g} s" in lines[-1]
    assert "--dist-timeout" in lines[-1] and "--resume" in lines[-1]
    assert "Traceback" not in "\n".join(lines)
    print(f"rank 0 stopped {waited:.1f} s after its peer hung (timeout {TIMEOUT_S} s)")


def _drift_rank(rank: int, init: str, out: str, steps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from metagrad.training import Trainer, preset

    cfg = preset("sinusoid").replace(iterations=steps, val_every=10**6, log_every=10**6)
    t = Trainer(cfg, None, progress=False)
    t.train()
    if rank == 0:
        torch.save(t.learner.state_dict(), Path(out, "dist.pt"))
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [20, 200])
def test_float32_drift_of_two_ranks_against_one_process(steps: int) -> None:
    """The numbers in README's distributed paragraph (sinusoid preset, meta-batch 25, float32)."""
    from metagrad.training import Trainer, preset

    out = Path(tempfile.mkdtemp())
    torch.multiprocessing.start_processes(
        _drift_rank, args=(f"file://{out / 'rdv'}", str(out), steps), nprocs=2, join=True,
        start_method="spawn",
    )  # fmt: skip
    dist_state = torch.load(out / "dist.pt", weights_only=True)
    cfg = preset("sinusoid").replace(iterations=steps, val_every=10**6, log_every=10**6)
    single = Trainer(cfg, None, progress=False)
    single.train()
    worst_abs = worst_rel = 0.0
    for k, v in single.learner.state_dict().items():
        if not v.is_floating_point():
            continue
        d = float((dist_state[k] - v).abs().max())
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / max(float(v.abs().max()), 1e-12))
    print(f"{steps} float32 Adam steps: max |param diff| {worst_abs:.2e}, relative {worst_rel:.2e}")
    assert worst_abs < (1e-4 if steps <= 20 else 1e-2)
