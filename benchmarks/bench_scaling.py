"""Scaling curves: time and peak memory of one exact meta-step against tasks, inner steps, width.

    python benchmarks/bench_scaling.py [--quick] [--json PATH] [--markdown PATH] [--plots DIR]

Workload: MAML's sinusoid regression MLP ``1-W-W-1`` (ReLU, ``metagrad.models.sinusoid_mlp``),
K=10 support / 10 query points per task, second order, plain SGD inner loop (lr 0.01), mean of
the query losses over tasks, float32. Three sweeps:

* (a) tasks per meta-batch T in {1, 4, 16, 64}, 1 inner step, width 40;
* (b) inner steps K in {1, 5, 20, 100}, T=4, width 40;
* (c) hidden width W in {40, 160, 640}, T=16, 1 inner step.

Rows: metagrad ``strategy="auto"`` (the default), ``hvp_chain`` and ``checkpoint`` (the
constant-memory strategies), the hand-written torch.func vmap, the plain
``functional_call + autograd.grad(create_graph=True)`` loop and ``higher.innerloop_ctx``
(all from ``_peers.py``).

1. Gate (float64, one small cell: T=4, K=5, W=40): every row against the plain loop; relative
   error above 1e-8 marks the row WRONG in every table (its times are still shown, flagged).
2. Time (float32, ``torch.set_num_threads(1)``): per sweep point, two warm-up calls per row,
   then interleaved single calls (the starting row rotates every round); median. A row whose
   warm-up call takes longer than ``--cap-s`` is not timed at that point or beyond ("skipped").
3. Memory: peak RSS growth (VmHWM after minus VmRSS before, MB) of one meta-step in a fresh
   one-thread child process per cell (``_cell.run_cell``), after a warm-up call on min(T, 2) tasks.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir():
    sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _peers  # noqa: E402
from _cell import run_cell  # noqa: E402
from _workloads import MetaWorkload, sinusoid_tasks  # noqa: E402
from bench_meta import (  # noqa: E402
    TOL,
    _flat,
    _proc_status_kib,
    machine_info,
    make_step,
    rel_error,
    short_error,
)
from metagrad.models import sinusoid_mlp  # noqa: E402

ROWS: dict[str, _peers.Impl] = {
    "metagrad auto (default)": _peers.Impl(
        "metagrad auto", True, 2, _peers.metagrad_factory("auto")
    ),
    "metagrad hvp_chain": _peers.Impl(
        "metagrad hvp_chain", True, 2, _peers.metagrad_factory("hvp_chain")
    ),
    "metagrad checkpoint": _peers.Impl(
        "metagrad checkpoint", True, 2, _peers.metagrad_factory("checkpoint")
    ),
    "torch.func vmap (hand-written)": _peers.Impl("func vmap", False, 2, _peers.func_vmap),
    "plain loop": _peers.Impl("plain loop", False, 2, _peers.plain_loop, reference=True),
    "higher": _peers.Impl("higher", False, 2, _peers.higher_loop, _peers.HIGHER_ERR),
}
STYLE = {  # plot colour / marker per row
    "metagrad auto (default)": ("C0", "o"),
    "metagrad hvp_chain": ("C1", "s"),
    "metagrad checkpoint": ("C2", "^"),
    "torch.func vmap (hand-written)": ("C3", "D"),
    "plain loop": ("C4", "v"),
    "higher": ("C5", "x"),
}
GATE_CELL = (4, 5, 40)  # T, K, W


def workload(T: int, K: int, W: int) -> MetaWorkload:
    return MetaWorkload(
        name=f"sinusoid-T{T}-K{K}-W{W}",
        description=f"sinusoid MLP 1-{W}-{W}-1, {T} tasks, 10/10 points, {K} inner SGD steps",
        make_model=lambda: sinusoid_mlp(hidden=W),
        loss_fn=F.mse_loss,
        inner_lr=0.01,
        steps=K,
        make_tasks=lambda g: sinusoid_tasks(T, 10, 10, g),
    )


def sweeps(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {
            "tasks": {"var": "T", "points": [(t, 1, 40) for t in (1, 4)]},
            "steps": {"var": "K", "points": [(2, k, 40) for k in (1, 5)]},
            "width": {"var": "W", "points": [(4, 1, w) for w in (40, 160)]},
        }
    return {
        "tasks": {"var": "T", "points": [(t, 1, 40) for t in (1, 4, 16, 64)]},
        "steps": {"var": "K", "points": [(4, k, 40) for k in (1, 5, 20, 100)]},
        "width": {"var": "W", "points": [(16, 1, w) for w in (40, 160, 640)]},
    }


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------
def gate() -> dict[str, dict[str, Any]]:
    wl = workload(*GATE_CELL)
    out: dict[str, dict[str, Any]] = {}
    ref = _flat(make_step(wl, ROWS["plain loop"], torch.float64)[0]())
    for name, impl in ROWS.items():
        if impl.unavailable:
            out[name] = {"status": "unavailable", "detail": impl.unavailable}
            continue
        try:
            got = _flat(make_step(wl, impl, torch.float64)[0]())
        except Exception as err:
            out[name] = {"status": "FAILED", "detail": short_error(err)}
            continue
        err = rel_error(got, ref)
        out[name] = {"status": "ok" if err <= TOL else "WRONG", "rel_err": err}
    return out


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_point(
    point: tuple[int, int, int], names: list[str], budget_s: float, max_rounds: int, cap_s: float
) -> dict[str, dict[str, Any]]:
    """Median ms of interleaved single calls per row; rows slower than ``cap_s`` are skipped."""
    wl = workload(*point)
    res: dict[str, dict[str, Any]] = {}
    steps = []
    for name in names:
        try:
            steps.append((name, make_step(wl, ROWS[name], torch.float32)[0]))
        except Exception as err:
            res[name] = {"status": "FAILED", "detail": short_error(err)}
    gc.collect()
    gc.freeze()
    round_ms = 0.0
    kept = []
    for name, fn in steps:
        try:
            ms = min(_timed(fn) for _ in range(2))  # warm-up
        except Exception as err:
            res[name] = {"status": "FAILED", "detail": "float32: " + short_error(err)}
            continue
        if ms > cap_s * 1e3:
            res[name] = {"status": "skipped", "detail": f"{ms / 1e3:.1f} s per call > cap"}
            continue
        round_ms += ms
        kept.append((name, fn))
    rounds = min(max_rounds, max(3, int(budget_s * 1e3 / max(round_ms, 1e-3))))
    times: dict[str, list[float]] = {n: [] for n, _ in kept}
    for r in range(rounds):
        for j in range(len(kept)):
            name, fn = kept[(r + j) % len(kept)]
            times[name].append(_timed(fn))
    for name, ts in times.items():
        res[name] = {"status": "ok", "times_ms": ts}
    del steps, kept
    gc.unfreeze()
    gc.collect()
    return res


# ---------------------------------------------------------------------------------------------
# memory: one fresh child per cell
# ---------------------------------------------------------------------------------------------
def _cell(T: int, K: int, W: int, name: str) -> dict[str, Any]:
    """Runs in the child (``_cell.run_cell``): peak RSS growth of one float32 meta-step."""
    torch.set_num_threads(1)
    # autograd.grad(grad_outputs=...) imports torch.fx's symbolic shapes on first use: a
    # one-time library cost, not the step's memory (as in bench_memory.py)
    importlib.import_module("torch.fx.experimental.symbolic_shapes")

    wl = workload(T, K, W)
    # Warm up on min(T, 2) tasks: the same code path as the measured call (the default runs one
    # task as the loop, more with vmap), so vmap's one-time set-up is not counted as the step.
    fn, warm = make_step(wl, ROWS[name], torch.float32, warm_tasks=min(T, 2))
    warm()
    gc.collect()
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    fn()
    after = _proc_status_kib("VmHWM")
    assert before is not None and after is not None
    return {"peak_mb": (after - before) / 1024}


def memory_cell(point: tuple[int, int, int], name: str) -> dict[str, Any]:
    res, err = run_cell("bench_scaling", *point, name)
    return {"error": err} if err is not None else res


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def md_tables(result: dict[str, Any]) -> str:
    lines: list[str] = []
    gate_res = result["gate"]
    titles = {
        "tasks": "(a) tasks per meta-batch T (1 inner step, width 40)",
        "steps": "(b) inner steps K (T=4, width 40)",
        "width": "(c) hidden width W (T=16, 1 inner step)",
    }
    for sname, sw in result["sweeps"].items():
        var = sw["var"]
        idx = {"T": 0, "K": 1, "W": 2}[var]
        vals = [p[idx] for p in sw["points"]]
        lines += [
            f"**{titles[sname]}**: median ms per meta-step (x the fastest peer) / peak RSS growth MB",
            "",
        ]
        lines.append("| row | " + " | ".join(f"{var}={v}" for v in vals) + " |")
        lines.append("|---|" + "---|" * len(vals))
        peer_best = {}
        for p in sw["points"]:
            key = "x".join(map(str, p))
            peer = [r["median_ms"] for n, r in sw["time"][key].items() if r["status"] == "ok"
                    and not ROWS[n].is_metagrad and gate_res[n]["status"] == "ok"]  # fmt: skip
            peer_best[key] = min(peer) if peer else None
        for name in ROWS:
            cells = []
            for p in sw["points"]:
                key = "x".join(map(str, p))
                t = sw["time"][key].get(name, {"status": "-"})
                m = sw["memory"].get(key, {}).get(name)
                ts = fmt_ms(t["median_ms"]) if t["status"] == "ok" else t["status"]
                if t["status"] == "ok" and peer_best[key]:
                    ts += f" ({t['median_ms'] / peer_best[key]:.2f}x)"
                ms = "-" if m is None else ("err" if "error" in m else f"{m['peak_mb']:.1f}")
                cells.append(f"{ts} / {ms}")
            flag = "" if gate_res[name]["status"] == "ok" else f" ({gate_res[name]['status']})"
            lines.append(f"| {name}{flag} | " + " | ".join(cells) + " |")
        best = []
        for p, v in zip(sw["points"], vals):
            key = "x".join(map(str, p))
            ok = {n: r["median_ms"] for n, r in sw["time"][key].items() if r["status"] == "ok"
                  and gate_res[n]["status"] == "ok"}  # fmt: skip
            if ok:
                n = min(ok, key=ok.get)  # type: ignore[arg-type]
                best.append(f"{var}={v}: {n}")
        lines += ["", "Fastest (gated rows): " + "; ".join(best) + ".", ""]
    return "\n".join(lines)


def plots(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    m = result["machine"]
    load = m.get("loadavg_at_start") or [float("nan")]
    caption = (
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs, load {load[0]:.1f}), 1 thread,\n"
        f"torch {m['torch']}, float32, 2nd order, SGD inner loop"
    )
    specs = [
        ("tasks", "time", "T (tasks per meta-batch)", "ms per meta-step", "time_vs_tasks.png",
         "Time vs tasks (K=1, width 40)"),
        ("steps", "time", "K (inner steps)", "ms per meta-step", "time_vs_steps.png",
         "Time vs inner steps (T=4, width 40)"),
        ("steps", "memory", "K (inner steps)", "peak RSS growth (MB)", "memory_vs_steps.png",
         "Peak memory vs inner steps (T=4, width 40)"),
        ("width", "time", "W (hidden width)", "ms per meta-step", "time_vs_width.png",
         "Time vs width (T=16, K=1)"),
        ("width", "memory", "W (hidden width)", "peak RSS growth (MB)", "memory_vs_width.png",
         "Peak memory vs width (T=16, K=1)"),
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for sname, kind, xlabel, ylabel, fname, title in specs:
        sw = result["sweeps"][sname]
        idx = {"T": 0, "K": 1, "W": 2}[sw["var"]]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name in ROWS:
            xs, ys = [], []
            for p in sw["points"]:
                key = "x".join(map(str, p))
                if kind == "time":
                    r = sw["time"][key].get(name, {})
                    v = r.get("median_ms") if r.get("status") == "ok" else None
                else:
                    v = sw["memory"].get(key, {}).get(name, {}).get("peak_mb")
                if v is not None:
                    xs.append(p[idx])
                    ys.append(max(v, 1e-2) if kind == "time" else v)
            if xs:
                c, mk = STYLE[name]
                lab = name + ("" if result["gate"][name]["status"] == "ok" else " (WRONG)")
                ax.plot(xs, ys, marker=mk, color=c, label=lab)
        ax.set_xscale("log")
        if kind == "time":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([p[idx] for p in sw["points"]])
        ax.set_xticklabels([str(p[idx]) for p in sw["points"]])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{caption}", fontsize=7.5)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7.5)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(str(out_dir / fname))
    return written


def _source_state() -> str:
    """HEAD of the repository and whether src/ has uncommitted changes (children import src)."""
    import subprocess

    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True)
        return out.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + (" + uncommitted src/ changes" if git("status", "--porcelain", "src") else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny grid, few rounds (seconds)")
    ap.add_argument("--json", default=None, help="write all results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the tables here")
    ap.add_argument("--plots", default=None, help="PNG directory (default: benchmarks/plots)")
    ap.add_argument("--budget-s", type=float, default=None, help="timed seconds per sweep point")
    ap.add_argument("--rounds", type=int, default=None, help="at most this many timed rounds")
    ap.add_argument("--cap-s", type=float, default=3.0, help="skip rows slower than this per call")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--passes", type=int, default=None, help="timing passes (default 2, quick 1)")
    ap.add_argument("--replot", default=None, help="only redraw the plots from this JSON file")
    args = ap.parse_args(argv)
    if args.replot:
        old = json.loads(Path(args.replot).read_text())
        print(md_tables(old))
        for f in plots(old, Path(args.plots) if args.plots else HERE / "plots"):
            print("wrote", f)
        return 0
    torch.set_num_threads(1)
    budget = args.budget_s if args.budget_s is not None else (0.3 if args.quick else 20.0)
    max_rounds = args.rounds if args.rounds is not None else (3 if args.quick else 25)
    args.passes = args.passes or (1 if args.quick else 2)
    t_start = time.perf_counter()
    machine = machine_info()
    import metagrad

    machine["metagrad"] = metagrad.__version__
    machine["source_at_start"] = _source_state()
    print(f"machine: {machine}", flush=True)

    g = gate()
    for name, r in g.items():
        print(
            f"gate T,K,W={GATE_CELL} {name:32s} {r['status']:8s} {r.get('rel_err', r.get('detail', ''))}"
        )
    names = [n for n in ROWS if g[n]["status"] in ("ok", "WRONG")]

    result: dict[str, Any] = {"machine": machine, "gate_cell": GATE_CELL, "gate": g, "tol": TOL,
                              "cap_s": args.cap_s, "budget_s": budget, "max_rounds": max_rounds,
                              "passes": args.passes,
                              "sweeps": {}}  # fmt: skip
    order = [(sname, p) for sname, sw in sweeps(args.quick).items() for p in sw["points"]]
    for sname, sw in sweeps(args.quick).items():
        result["sweeps"][sname] = {"var": sw["var"], "points": sw["points"], "time": {},
                                   "memory": {}}  # fmt: skip
    # Several passes over all points (every other one in reverse order) and the samples pooled,
    # so that a burst of load from other processes does not decide one point on its own.
    for npass in range(args.passes):
        skipped: dict[str, set[str]] = {s: set() for s in result["sweeps"]}
        for sname, p in order if npass % 2 == 0 else order[::-1]:
            entry = result["sweeps"][sname]
            key = "x".join(map(str, p))
            prev = entry["time"].get(key)
            if prev is None:  # first pass: once over the cap, larger points are skipped too
                todo = [n for n in names if n not in skipped[sname]]
            else:
                todo = [n for n in names if prev[n]["status"] == "ok"]
            res = time_point(p, todo, budget / args.passes, max_rounds, args.cap_s)
            if prev is None:
                for n in names:
                    if n in skipped[sname]:
                        res[n] = {"status": "skipped",
                                  "detail": "slower than the cap at a smaller point"}  # fmt: skip
                    elif res[n]["status"] == "skipped":
                        skipped[sname].add(n)
                for r in res.values():
                    r["loadavg"] = [os.getloadavg()[0]]
                entry["time"][key] = res
            else:
                for n, r in res.items():
                    if r["status"] != "ok":
                        prev[n] = r
                    elif prev[n]["status"] == "ok":
                        prev[n]["times_ms"] += r["times_ms"]
                        prev[n]["loadavg"].append(os.getloadavg()[0])
                res = prev
            for r in res.values():
                if r["status"] == "ok":
                    ts = r["times_ms"]
                    q = (
                        statistics.quantiles(ts, n=4, method="inclusive")
                        if len(ts) >= 2
                        else [ts[0]] * 3
                    )
                    r.update(median_ms=statistics.median(ts), iqr_ms=q[2] - q[0], rounds=len(ts))
            load = os.getloadavg()[0]
            print(f"pass {npass + 1} {sname} T,K,W={p} load {load:.2f}: " + "; ".join(
                f"{n} {r['median_ms']:.2f}" if r["status"] == "ok" else f"{n} {r['status']}"
                for n, r in res.items()), flush=True)  # fmt: skip
    result["loadavg_after_timing"] = list(os.getloadavg())
    if not args.no_memory:
        for sname, entry in result["sweeps"].items():
            pts = entry["points"]
            if args.quick:  # one cell per row
                pts = entry["points"][-1:] if sname == "steps" else []
            for p in pts:
                key = "x".join(map(str, p))
                entry["memory"][key] = {}
                for n in names:
                    if entry["time"][key][n]["status"] != "ok":
                        continue
                    entry["memory"][key][n] = memory_cell(p, n)
                print(f"memory {sname} T,K,W={p}: " + "; ".join(
                    f"{n} {r.get('peak_mb', float('nan')):.1f} MB" + (f" ({r['error']})" if "error" in r else "")
                    for n, r in entry["memory"][key].items()), flush=True)  # fmt: skip
    machine["loadavg_at_end"] = list(os.getloadavg())
    machine["source_at_end"] = _source_state()
    result["wall_s"] = time.perf_counter() - t_start
    text = md_tables(result)
    print("\n" + text)
    out_dir = Path(args.plots) if args.plots else HERE / "plots"
    for f in plots(result, out_dir):
        print("wrote", f)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(f"wall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
