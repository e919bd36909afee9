"""``innerloop_ctx`` loops with real ``higher`` and with ``metagrad.compat.higher``, one process.

The same user code runs with either module (only ``import higher`` changes):

* ``sinusoid``: MAML on the sinusoid MLP 1-40-40-1, 25 tasks, K=10 support / 10 query,
  5 inner SGD steps (lr 0.01), one ``innerloop_ctx`` per task, ``copy_initial_weights=False``,
  second order, ``(query loss / 25).backward()`` per task.
* ``omniglot``: the loop of higher's ``examples/maml-omniglot.py`` on Omniglot-shaped random
  data (28x28): conv-4 (``metagrad.models.conv4``: four blocks of 3x3 conv with 64 filters,
  BatchNorm, ReLU, max-pool), 5-way 1-shot, 15 queries per class, 4 tasks, 5 inner SGD steps
  (lr 0.1).
* ``hypergrad``: a 10-step hypergradient of an MLP 20-64-64-10: SGD with momentum whose
  learning rate and weight decay are tensors given through ``override``, 10 training batches of
  64, the validation loss (256 examples) differentiated with respect to both.

First a float64 gate: both modules run every workload from the same weights and data and the
gradients must agree (relative error printed). Then time: float32, ``torch.set_num_threads(1)``,
interleaved rounds (both modules once per round, order alternating): medians, and the median of
the per-round ratios (robust to load that drifts between rounds). Peak memory: a
fresh subprocess per module and workload records the growth of the peak resident set
(``VmHWM``) over one iteration, after a small warm-up iteration.

Usage::

    python benchmarks/bench_higher.py [--rounds 9] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from metagrad.models import conv4, sinusoid_mlp

MODULES = {"higher": "higher", "compat": "metagrad.compat.higher"}
WORKLOADS = ("sinusoid", "omniglot", "hypergrad")


class Work:
    """A model, its data and the user's loop; ``run(hi)`` is one outer iteration."""

    def __init__(self, name: str, dtype: torch.dtype, small: bool = False) -> None:
        self.name = name
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        if name == "sinusoid":
            T, K = (2, 10) if small else (25, 10)
            self.model: nn.Module = sinusoid_mlp()
            amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
            phase = torch.empty(T, 1, 1).uniform_(0.0, torch.pi, generator=g)
            xs = torch.empty(T, K, 1).uniform_(-5, 5, generator=g)
            xq = torch.empty(T, K, 1).uniform_(-5, 5, generator=g)
            self.data = (xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase))
            self.steps, self.lr = (1 if small else 5), 0.01
        elif name == "omniglot":
            T, Q = (1, 1) if small else (4, 15)
            self.model = conv4(n_way=5, hidden=64)
            xs = torch.rand(T, 5, 1, 28, 28, generator=g)
            xq = torch.rand(T, 5 * Q, 1, 28, 28, generator=g)
            ys = torch.arange(5).repeat(T, 1)
            yq = torch.arange(5).repeat_interleave(Q).repeat(T, 1)
            self.data = (xs, ys, xq, yq)
            self.steps, self.lr = (1 if small else 5), 0.1
        else:
            self.model = nn.Sequential(
                nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
            )
            n = 2 if small else 10
            self.batches = [
                (torch.randn(64, 20, generator=g), torch.randint(0, 10, (64,), generator=g))
                for _ in range(n)
            ]
            self.val = (
                torch.randn(256, 20, generator=g),
                torch.randint(0, 10, (256,), generator=g),
            )
            self.hyper = [torch.tensor(0.1), torch.tensor(1e-3)]
        self.model.to(dtype).train()
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        if name == "hypergrad":
            self.batches = [(cast(x), y) for x, y in self.batches]
            self.val = (cast(self.val[0]), self.val[1])
            self.hyper = [h.to(dtype).requires_grad_() for h in self.hyper]
        else:
            self.data = tuple(cast(t) for t in self.data)

    def run(self, hi: Any) -> None:
        if self.name == "hypergrad":
            self._hypergrad(hi)
        else:
            self._maml(hi)

    def _maml(self, hi: Any) -> None:
        # The loop of higher's MAML examples.
        net = self.model
        xs, ys, xq, yq = self.data
        loss_fn = F.mse_loss if self.name == "sinusoid" else F.cross_entropy
        inner_opt = torch.optim.SGD(net.parameters(), lr=self.lr)
        net.zero_grad(set_to_none=True)
        for i in range(xs.shape[0]):
            with hi.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(self.steps):
                    diffopt.step(loss_fn(fnet(xs[i]), ys[i]))
                (loss_fn(fnet(xq[i]), yq[i]) / xs.shape[0]).backward()

    def _hypergrad(self, hi: Any) -> None:
        lr, wd = self.hyper
        lr.grad = wd.grad = None
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        override = {"lr": [lr], "weight_decay": [wd]}
        with hi.innerloop_ctx(self.model, opt, override=override) as (fmodel, diffopt):
            for x, y in self.batches:
                diffopt.step(F.cross_entropy(fmodel(x), y))
            F.cross_entropy(fmodel(self.val[0]), self.val[1]).backward()

    def grads(self) -> list[Tensor]:
        if self.name == "hypergrad":
            return [h.grad.detach().clone() for h in self.hyper]  # type: ignore[union-attr]
        return [p.grad.detach().clone() for p in self.model.parameters()]  # type: ignore[union-attr]


def gate(name: str, mods: dict[str, Any]) -> float:
    """Relative error between the two modules' gradients, float64."""
    out = {}
    for key, hi in mods.items():
        w = Work(name, torch.float64)
        w.run(hi)
        out[key] = w.grads()
    a, b = out["compat"], out["higher"]
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in b) ** 0.5
    return num / den


def _hwm_kb() -> int:
    # VmHWM belongs to this process's address space, which exec made fresh; ru_maxrss would
    # start from the parent's peak (Linux carries it across fork and exec).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_cell(name: str, key: str) -> float:
    """Child process: growth of the peak RSS (MB) over one iteration, after a warm-up."""
    torch.set_num_threads(1)
    # A one-time library import on first double backward (~40 MB), not activation memory.
    importlib.import_module("torch.fx.experimental.symbolic_shapes")

    hi = importlib.import_module(MODULES[key])
    Work(name, torch.float32, small=True).run(hi)
    w = Work(name, torch.float32)
    before = _hwm_kb()
    w.run(hi)
    return (_hwm_kb() - before) / 1024.0


def peak_mb(name: str, key: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
        f"import bench_higher as b; print(b._peak_cell({name!r}, {key!r}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1])
    return float(res.stdout.strip().splitlines()[-1])


def timings(name: str, mods: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    works = {key: Work(name, torch.float32) for key in mods}
    steps: dict[str, Callable[[], None]] = {
        key: (lambda w=works[key], hi=hi: w.run(hi)) for key, hi in mods.items()
    }
    for fn in steps.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {key: [] for key in mods}
    keys = list(mods)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            steps[key]()
            samples[key].append((time.perf_counter() - t0) * 1e3)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="2 rounds, sinusoid and hypergrad only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        real = importlib.import_module("higher")
    except ImportError:
        sys.exit("bench_higher.py needs higher: pip install higher (or pip install -e .[bench]).")
    mods = {"higher": real, "compat": importlib.import_module(MODULES["compat"])}
    names = ["sinusoid", "hypergrad"] if args.quick else list(WORKLOADS)
    rounds = 2 if args.quick else args.rounds
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} logical CPUs, load average at start "
        f"{load}. Python {platform.python_version()}, torch {torch.__version__}, higher "
        f"{getattr(real, '__version__', '0.2.1')}, 1 thread, {rounds} interleaved rounds.\n"
    )
    print(
        "| workload | gate: rel. error (float64) | higher ms | compat ms | time compat/higher (per round) "
        "| higher peak MB | compat peak MB | memory compat/higher |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        err = gate(name, mods)
        if not err < 1e-10:
            sys.exit(f"{name}: the gradients differ (relative error {err:.1e}); not timing.")
        t = timings(name, mods, rounds)
        med = {k: statistics.median(v) for k, v in t.items()}
        # Each round times both modules back to back: the median of the per-round ratios is
        # robust to load that drifts between rounds (2 cores shared with other jobs).
        paired = statistics.median(c / h for c, h in zip(t["compat"], t["higher"]))
        mem = {k: peak_mb(name, k) for k in mods}
        # The peak RSS moves by whole allocator chunks: below ~1 MB a ratio means nothing.
        small = min(mem.values()) < 1.0
        mem_ratio = "n/a (< 1 MB)" if small else f"{mem['compat'] / mem['higher']:.2f}x"
        print(
            f"| {name} | {err:.1e} | {med['higher']:.1f} | {med['compat']:.1f} | "
            f"{paired:.2f}x | {mem['higher']:.2f} | {mem['compat']:.2f} | "
            f"{mem_ratio} |",
            flush=True,
        )
    print(json.dumps({"load_average_at_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
