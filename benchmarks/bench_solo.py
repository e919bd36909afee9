"""One implementation per fresh process, as a user's own script runs it (no interleaving).

``bench_meta.py`` interleaves every peer in one process, which shares one heap between them:
each peer then runs on memory the others freed. A user's script runs one implementation, and
glibc's allocator (mmap threshold, heap trimming) makes the time of a step depend on that
process's history. This driver starts ``--processes`` fresh interpreters per implementation,
in rotated order, each timing ``--calls`` meta-steps after 3 warm-up calls, and prints each
process's median time and minor page faults per call, then the median over processes.

    python benchmarks/bench_solo.py --workload mlp640-16tasks --processes 8

1 CPU thread per process (``torch.set_num_threads(1)``); run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import copy
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("plain", "torchopt", "metagrad")


def _one(workload: str, impl: str, calls: int, profile: int = 0) -> None:
    """Child process: time ``calls`` meta-steps of ``impl``; print ``ms faults``.

    ``profile > 0``: afterwards run that many more meta-steps under ``torch.profiler`` and print
    the ops with the most self CPU time (to stderr, so the parent's parsing is unchanged)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _peers
    import _workloads

    wl = next(w for w in _workloads.meta_workloads(False) if w.name == workload)
    model, tasks = wl.build(torch.float32)
    make = {
        "plain": lambda: _peers.plain_loop(_workloads.peer_copy(model), wl),
        "torchopt": lambda: _peers.torchopt_func(_workloads.peer_copy(model), wl),
        "metagrad": lambda: _peers.metagrad_factory("auto")(copy.deepcopy(model), wl),
    }[impl]
    step = make()
    for _ in range(3):
        step(tasks)
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        t0 = time.perf_counter()
        step(tasks)
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / calls
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(profile):
                step(tasks)
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        print(f"{impl}: {profile} profiled meta-steps\n{table}", file=sys.stderr)
    print(f"{1e3 * statistics.median(times):.1f} {faults:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mlp640-16tasks")
    ap.add_argument("--processes", type=int, default=8, help="fresh processes per implementation")
    ap.add_argument("--calls", type=int, default=15, help="timed meta-steps per process")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="with --only: profile N more meta-steps per process and print the top ops",
    )  # fmt: skip
    ap.add_argument("--only", choices=IMPLS, help="run this implementation's processes only")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _one(args.workload, args.child, args.calls, args.profile)
        return
    if args.profile and not args.only:
        ap.error("--profile needs --only IMPL (one implementation's table at a time)")
    impls = (args.only,) if args.only else IMPLS
    ms: dict[str, list[float]] = {k: [] for k in impls}
    faults: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(args.processes):
        k = r % len(impls)
        for impl in impls[k:] + impls[:k]:
            cmd = [sys.executable, __file__, "--workload", args.workload, "--child", impl]
            cmd += ["--calls", str(args.calls), "--profile", str(args.profile)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out = run.stdout.split()
            if args.profile:
                print(run.stderr)
            ms[impl].append(float(out[-2]))
            faults[impl].append(float(out[-1]))
            print(f"process {r + 1} {impl:9s} {out[-2]:>7s} ms  {out[-1]:>6s} faults/call")
    best_impl = min(impls, key=lambda i: statistics.median(ms[i]))
    best = statistics.median(ms[best_impl])
    print(f"\n{args.workload}: median over {args.processes} processes (x the best; 95% interval")
    print("of that ratio from 2,000 resamplings of the processes)")
    rng = random.Random(0)
    for impl in impls:
        m = statistics.median(ms[impl])
        boot = sorted(
            statistics.median(rng.choices(ms[impl], k=len(ms[impl])))
            / statistics.median(rng.choices(ms[best_impl], k=len(ms[best_impl])))
            for _ in range(2000)
        )
        print(
            f"  {impl:9s} {m:7.1f} ms ({m / best:.2f}x, {boot[50]:.2f}-{boot[1949]:.2f})  range "
            f"{min(ms[impl]):.1f}-{max(ms[impl]):.1f}  faults/call {statistics.median(faults[impl]):.0f}"
        )


if __name__ == "__main__":
    main()
