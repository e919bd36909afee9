"""Side-by-side benchmark: metagrad vs peers on one exact meta-step, HVPs and Hessians.

    python benchmarks/bench_meta.py [--quick] [--repeats N] [--json out.json] [--markdown out.md]

1. Correctness gate (float64, same model and data for everyone): each implementation's
   meta-gradient is compared with the plain per-task loop; relative error above 1e-8 marks the
   row WRONG and removes it from the peer comparison.
2. Timing (float32, one thread): warm-up, then round-robin over implementations (the starting
   implementation rotates every round) so machine drift hits everyone alike; median and IQR.
3. Memory: RSS growth (``ru_maxrss``) over one step in a fresh subprocess per cell.

See benchmarks/README.md for the meaning of every column.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir():
    sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import _peers  # noqa: E402
from _peers import Impl, deriv_impls, meta_impls, package_version  # noqa: E402
from _workloads import (  # noqa: E402
    DerivWorkload,
    MetaWorkload,
    deriv_workloads,
    meta_workloads,
    peer_copy,
)

TOL = 1e-8
Workload = MetaWorkload | DerivWorkload


@dataclass
class Row:
    impl: str
    metagrad: bool
    order: int
    status: str = "ok"  # ok | reference | WRONG | FAILED | refused | unavailable
    detail: str = ""
    rel_err: float | None = None
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    iqr_ms: float | None = None
    ratio: float | None = None
    peak_mb: float | None = None
    note: str = ""

    @property
    def valid(self) -> bool:
        return self.status in ("ok", "reference")


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "higher": package_version("higher")
        + ("" if _peers.HIGHER_ERR is None else f" ({_peers.HIGHER_ERR})"),
        "torchopt": package_version("torchopt")
        + ("" if _peers.TORCHOPT_ERR is None else f" ({_peers.TORCHOPT_ERR})"),
        "learn2learn": "not used (does not install on Python 3.11); l2l-style loop instead",
    }


# ---------------------------------------------------------------------------------------------
# building one implementation's step function
# ---------------------------------------------------------------------------------------------
def make_step(
    wl: Workload, impl: Impl, dtype: torch.dtype, warm_tasks: int | None = None
) -> tuple[Callable, Callable]:
    """``(full, warm)``: zero-argument calls of ``impl`` (own model copy) on the workload's data
    and on its warm-up slice (the first ``warm_tasks or wl.warmup_tasks`` tasks)."""
    assert impl.factory is not None
    if isinstance(wl, MetaWorkload):
        model, tasks = wl.build(dtype)
        mine = copy.deepcopy(model).train() if impl.is_metagrad else peer_copy(model)
        step = impl.factory(mine, wl)
        k = warm_tasks or wl.warmup_tasks
        part = tasks if k is None else tuple(t[:k] for t in tasks)
        return (lambda: step(tasks)), (lambda: step(part))
    fn = impl.factory(wl.build(dtype))
    return fn, fn


def impls_for(wl: Workload) -> list[Impl]:
    if isinstance(wl, DerivWorkload):
        return deriv_impls(wl)
    images = wl.build(torch.float32)[1][0].dim() == 5  # (tasks, batch, C, H, W)
    return [
        i
        for i in meta_impls()
        if (i.order == 2 or not wl.second_order_only) and (images or not i.images_only)
    ]


def _flat(out: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        return {"": out.detach().clone()}
    return {k: v.detach().clone() for k, v in out.items()}


def rel_error(got: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    missing = set(ref) ^ set(got)
    if missing:
        return float("inf")
    num = sum(float((got[k].double() - ref[k].double()).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].double().pow(2).sum()) for k in ref)
    return (num / den) ** 0.5 if den > 0 else num**0.5


def short_error(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg}"[:160]


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------
def gate(wl: Workload, impls: list[Impl], rows: list[Row]) -> None:
    """Float64 correctness of every row against the reference row of the same order."""
    refs: dict[int, dict[str, Tensor]] = {}
    for impl, row in zip(impls, rows):
        if impl.unavailable:
            row.status, row.detail = "unavailable", impl.unavailable.removeprefix("unavailable: ")
            continue
        try:
            out = _flat(make_step(wl, impl, torch.float64)[0]())
        except ValueError as err:
            # metagrad validates its inputs: a ValueError is a deliberate refusal, not a crash
            row.status = "refused" if impl.is_metagrad else "FAILED"
            row.detail = short_error(err)
            continue
        except Exception as err:
            row.status, row.detail = "FAILED", short_error(err)
            continue
        if impl.reference:
            refs[impl.order] = out
            row.status, row.rel_err = "reference", 0.0
            continue
        ref = refs.get(impl.order)
        if ref is None:
            row.status, row.detail = "FAILED", "reference implementation failed"
            continue
        row.rel_err = rel_error(out, ref)
        row.status = "ok" if row.rel_err <= TOL else "WRONG"
        del out
    gc.collect()


def inherit_gate(rows: list[Row], source: list[Row]) -> None:
    by_name = {r.impl: r for r in source}
    for row in rows:
        src = by_name[row.impl]
        row.status, row.detail, row.rel_err = src.status, src.detail, src.rel_err


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_rows(
    wl: Workload, impls: list[Impl], rows: list[Row], repeats: int, quick: bool
) -> tuple[int, float]:
    """Warm-up then interleaved rounds; returns (rounds, seconds spent)."""
    chosen = [
        (impl, row)
        for impl, row in zip(impls, rows)
        if row.valid or (row.status == "WRONG" and wl.time_wrong)
    ]
    if not chosen:
        return 0, 0.0
    start = time.perf_counter()
    steps = []
    for impl, row in chosen:
        try:
            steps.append((make_step(wl, impl, torch.float32), row))
        except Exception as err:
            row.status, row.detail = "FAILED", "float32: " + short_error(err)
    gc.collect()
    gc.freeze()  # long-lived objects (torch, models, data) out of the collector's way
    round_ms = 0.0
    for _ in range(wl.warmup):  # lazy initialisation, kernels, allocator
        round_ms = 0.0
        for (_, warm), row in steps:
            try:
                round_ms += _timed(warm)
            except Exception as err:  # float32-only failure
                row.status, row.detail = "FAILED", "float32: " + short_error(err)
        steps = [(fns, row) for fns, row in steps if row.status != "FAILED"]
    k = getattr(wl, "warmup_tasks", None)
    if k:  # the warm-up ran on k tasks: scale to the full batch
        round_ms *= wl.build(torch.float32)[1][0].shape[0] / k
    budget = wl.time_budget_s * (0.5 if quick else 1.0)
    rounds = int(budget * 1e3 / round_ms) if round_ms > 0 else 3
    rounds = min(repeats, max(3, rounds))
    n = len(steps)
    for r in range(rounds):
        for j in range(n):
            (full, _), row = steps[(r + j) % n]
            row.times_ms.append(_timed(full))
    for _, row in steps:
        ts = row.times_ms
        row.median_ms = statistics.median(ts)
        if len(ts) >= 2:
            q = statistics.quantiles(ts, n=4, method="inclusive")
            row.iqr_ms = q[2] - q[0]
    for order in {r.order for r in rows}:
        peers = [
            r.median_ms
            for r in rows
            if r.order == order and not r.metagrad and r.valid and r.median_ms is not None
        ]
        if peers:
            best = min(peers)
            for r in rows:
                if r.order == order and r.valid and r.median_ms is not None:
                    r.ratio = r.median_ms / best
    del steps
    gc.unfreeze()
    gc.collect()
    return rounds, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# memory: one cell per fresh subprocess
# ---------------------------------------------------------------------------------------------
def all_workloads(quick: bool) -> list[Workload]:
    return [*meta_workloads(quick), *deriv_workloads(quick)]


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_cell(wl_name: str, impl_name: str) -> dict[str, Any]:
    """Peak RSS growth (KiB) over one step; runs in a process of its own (see ``mem_server``).

    A warm-up first: meta-steps run once on one task; derivative workloads (no smaller
    version) take one plain gradient of ``f`` with autograd and with torch.func, so lazy
    initialisation is not counted. Linux: current RSS before the step, then the RSS high-water
    mark (``VmHWM``, reset just before the step through ``/proc/self/clear_refs``) after.
    ``ru_maxrss`` is not usable on Linux (it keeps the peak of the process that forked it);
    it is the fallback elsewhere.
    """
    import resource

    wl = next(w for w in all_workloads(False) if w.name == wl_name)
    impl = next(i for i in impls_for(wl) if i.name == impl_name)
    fn, warm = make_step(wl, impl, torch.float32, warm_tasks=1)
    if isinstance(wl, MetaWorkload):
        warm()
    else:
        pb = wl.build(torch.float32)
        x = pb.x.detach().requires_grad_()
        torch.autograd.grad(pb.f(x), x)
        torch.func.grad(pb.f)(pb.x)
    gc.collect()
    before = _proc_status_kib("VmRSS")
    how = "VmHWM"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        how = "ru_maxrss"
    if how == "ru_maxrss" or before is None:
        how = "ru_maxrss"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = (
        _proc_status_kib("VmHWM")
        if how == "VmHWM"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return {"before_kib": before, "after_kib": after, "how": how}


def mem_server(cells_file: str, workers: int) -> None:
    """Subprocess entry: import torch once, then fork one fresh child process per cell.

    The children start from a process that has only imported the libraries (no tensor work),
    so each cell's figure is that of a fresh process, without paying the torch import 50 times.
    Prints ``{index: result}`` as JSON.
    """
    torch.set_num_threads(1)
    import metagrad.algorithms
    import metagrad.derivatives  # noqa: F401

    cells = json.loads(Path(cells_file).read_text())
    results: dict[int, Any] = {}
    running: dict[int, tuple[int, int]] = {}

    def reap() -> None:
        pid, _ = os.wait()
        idx, fd = running.pop(pid)
        with os.fdopen(fd) as pipe:
            text = pipe.read()
        try:
            results[idx] = json.loads(text)
        except json.JSONDecodeError:
            results[idx] = {"error": "child died without a result"}

    for idx, (wl_name, impl_name) in enumerate(cells):
        while len(running) >= workers:
            reap()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                out: dict[str, Any] = measure_cell(wl_name, impl_name)
            except BaseException as err:
                out = {"error": short_error(err)}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        running[pid] = (idx, r)
    while running:
        reap()
    print(json.dumps(results))


def mem_cell(wl_name: str, impl_name: str) -> None:
    """Subprocess entry without fork (non-POSIX): one cell, result as JSON."""
    torch.set_num_threads(1)
    print(json.dumps(measure_cell(wl_name, impl_name)))


def _apply_memory(row: Row, data: dict[str, Any]) -> None:
    if "error" in data:
        row.note = (row.note + "; " if row.note else "") + f"memory: {data['error']}"
    else:
        row.peak_mb = (data["after_kib"] - data["before_kib"]) / 1024


def measure_memory(cells: list[tuple[str, Row]], workers: int) -> None:
    script = str(Path(__file__).resolve())
    if hasattr(os, "fork"):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump([[wl_name, row.impl] for wl_name, row in cells], fh)
        try:
            cmd = [sys.executable, script, "--_memserver", fh.name, str(workers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
            lines = proc.stdout.strip().splitlines()
            results = json.loads(lines[-1]) if lines else {}
        except Exception as err:
            results = {}
            print(f"   memory server failed: {short_error(err)}")
        finally:
            os.unlink(fh.name)
        for k, (_, row) in enumerate(cells):
            _apply_memory(row, results.get(str(k), {"error": "no result from memory server"}))
        return

    def run(cell: tuple[str, Row]) -> None:
        wl_name, row = cell
        cmd = [sys.executable, script, "--_memcell", wl_name, row.impl]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            _apply_memory(row, json.loads(proc.stdout.strip().splitlines()[-1]))
        except Exception as err:
            _apply_memory(row, {"error": short_error(err)})

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, cells))


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def fmt_ms(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def correct_cell(row: Row) -> str:
    if row.status == "reference":
        return "reference"
    if row.status == "ok":
        return f"yes ({row.rel_err:.1e})"
    if row.status == "WRONG":
        return f"WRONG (rel err {row.rel_err:.1e})"
    cut = row.detail if len(row.detail) <= 60 else row.detail[:57] + "..."
    if row.status in ("unavailable", "refused"):
        return f"{row.status}: {cut}"
    return f"FAILED: {cut}"


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    invalid = any(r.status == "WRONG" and r.median_ms is not None for r in rows)
    head = ["impl", "correct? (rel err)", "median ms", "IQR ms", "ratio vs best peer"]
    head += ["vs reference row", "peak MB"]
    if invalid:
        head.append("invalid ms (failed gate)")
    body = []
    # Meta-step workloads: the reference row of each order is the plain (create_graph) loop.
    refs = {r.order: r.median_ms for r in rows if r.status == "reference" and r.median_ms}
    for r in rows:
        name = ("**" + r.impl + "**") if r.metagrad else r.impl
        timed = r.valid and r.median_ms is not None
        cells = [
            name,
            correct_cell(r),
            fmt_ms(r.median_ms) if timed else "—",
            fmt_ms(r.iqr_ms) if timed else "—",
            f"{r.ratio:.2f}x" if r.ratio is not None else "—",
            f"{r.median_ms / refs[r.order]:.2f}x"
            if timed and r.median_ms is not None and r.order in refs
            else "—",
            f"{r.peak_mb:.1f}" if r.peak_mb is not None else "—",
        ]
        if invalid:
            bad = r.status == "WRONG" and r.median_ms is not None
            cells.append(f"{fmt_ms(r.median_ms)} (invalid)" if bad else "")
        body.append(cells)
    return head, body


def text_table(head: list[str], body: list[list[str]]) -> str:
    plain = [[c.replace("**", "") for c in row] for row in [head, *body]]
    widths = [max(len(row[i]) for row in plain) for i in range(len(head))]
    lines = []
    for k, row in enumerate(plain):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(head: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [head, *body]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


def notes_for(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.status in ("FAILED", "unavailable", "refused") and len(r.detail) > 60:
            out.append(f"{r.impl}: {r.status} with {r.detail}")
        if r.note:
            out.append(f"{r.impl}: {r.note}")
    return out


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    out = [
        "# metagrad side-by-side benchmark",
        "",
        f"Machine: {m['platform']}, {m['cpu']} ({m['logical_cpus']} logical CPUs, load average "
        f"at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'] or [])}). "
        f"Python {m['python']}, torch {m['torch']}, higher {m['higher']}, "
        f"torchopt {m['torchopt']}. `torch.set_num_threads(1)`.",
        "",
        f"Mode: {'quick' if s['quick'] else 'full'}; up to {s['repeats']} timed rounds per "
        f"workload (fewer where one round is slow, at least 3); correctness gate in float64 "
        f"(rel err <= {TOL:g} vs the reference row), timings in float32. Total wall time "
        f"{result['wall_s']:.0f} s.",
        "",
        "**bold** rows are metagrad; ratio = median / median of the fastest correct peer of "
        "the same order (first-order rows are compared with first-order peers only). Peak MB = "
        "RSS growth over one step in a fresh process.",
    ]
    for w in result["workloads"]:
        rows = [Row(**r) for r in w["rows"]]
        out += ["", f"## {w['name']}", "", w["description"], ""]
        out.append(f"Timed rounds: {w['rounds']}. {w['gate_note']}".strip())
        out += ["", md_table(*table(rows))]
        notes = notes_for(rows)
        if notes:
            out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def metagrad_notes(wl: Workload, impls: list[Impl], rows: list[Row]) -> None:
    if not isinstance(wl, MetaWorkload):
        return
    from metagrad.algorithms import MAML
    from metagrad.algorithms._task import resolve_strategy, vmap_pays

    model, (xs, _, xq, _) = wl.build(torch.float32)
    learner = MAML(copy.deepcopy(model), wl.loss_fn, wl.inner_lr, wl.steps)
    chosen = resolve_strategy("auto", learner.fmodel, "bench", 2, torch.device("cpu"))
    if chosen == "vmap" and not vmap_pays(dict(model.named_parameters()), xs, xq):
        chosen = "loop"
    for impl, row in zip(impls, rows):
        if impl.is_metagrad and "auto" in impl.name:
            row.note = f"auto resolves to strategy={chosen!r} on this model and these tasks"
        elif impl.is_metagrad and "vmap" in impl.name and chosen != "vmap":
            row.note = "forced; auto picks the loop on this model"
        elif impl.note:
            row.note = impl.note
    return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and workloads")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (15; quick: 5)")
    ap.add_argument("--json", type=Path, default=None, help="write all results as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help="write markdown tables")
    ap.add_argument("--only", nargs="*", default=None, help="workload names to run")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument(
        "--full-gate",
        action="store_true",
        help="gate every workload on its own data (the 32-task conv-4 gate costs minutes)",
    )
    ap.add_argument("--_memcell", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_memserver", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memcell:
        mem_cell(*args._memcell)
        return 0
    if args._memserver:
        mem_server(args._memserver[0], int(args._memserver[1]))
        return 0

    torch.set_num_threads(1)
    repeats = args.repeats or (5 if args.quick else 15)
    t_start = time.perf_counter()
    machine = machine_info()
    print("metagrad side-by-side benchmark")
    for k, v in machine.items():
        print(f"  {k}: {v}")
    print("  torch.set_num_threads(1) for every measurement (subprocesses too)")
    print(f"  mode: {'quick' if args.quick else 'full'}, up to {repeats} timed rounds\n")

    workloads = all_workloads(args.quick)
    if args.only:
        workloads = [w for w in workloads if w.name in args.only]
    results: list[dict[str, Any]] = []
    rows_by_name: dict[str, list[Row]] = {}
    mem_cells: list[tuple[str, Row]] = []
    for wl in workloads:
        impls = impls_for(wl)
        rows = [Row(i.name, i.is_metagrad, i.order) for i in impls]
        t0 = time.perf_counter()
        src = getattr(wl, "gate_from", None)
        if src and not args.full_gate and src in rows_by_name:
            inherit_gate(rows, rows_by_name[src])
            gate_note = (
                f"Gate inherited from {src} (float64, identical first tasks and model; "
                f"--full-gate re-runs it on all tasks)."
            )
        else:
            gate(wl, impls, rows)
            gate_note = "Gate: float64 on this workload's data."
        t_gate = time.perf_counter() - t0
        metagrad_notes(wl, impls, rows)
        rounds, t_time = time_rows(wl, impls, rows, repeats, args.quick)
        rows_by_name[wl.name] = rows
        if not args.no_memory and (not args.quick or wl.name.startswith("conv4")):
            mem_cells += [(wl.name, r) for r in rows if r.valid and r.median_ms is not None]
        print(f"== {wl.name}: {wl.description}")
        print(f"   gate {t_gate:.0f} s, timing {t_time:.0f} s ({rounds} rounds). {gate_note}")
        print(text_table(*table(rows)))
        for n in notes_for(rows):
            print(f"   note: {n}")
        print(flush=True)
        results.append(
            {
                "name": wl.name,
                "description": wl.description,
                "rounds": rounds,
                "gate_note": gate_note,
                "rows": rows,
            }
        )

    if mem_cells:
        t0 = time.perf_counter()
        measure_memory(mem_cells, workers=2)
        print(f"== memory: {len(mem_cells)} subprocesses in {time.perf_counter() - t0:.0f} s")
        for w in results:
            got = [f"{r.impl} {r.peak_mb:.1f}" for r in w["rows"] if r.peak_mb is not None]
            if got:
                print(f"   {w['name']} (MB): " + ", ".join(got))
        print()

    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        "machine": machine,
        "settings": {"quick": args.quick, "repeats": repeats, "tolerance": TOL},
        "workloads": [{**w, "rows": [asdict(r) for r in w["rows"]]} for w in results],
        "wall_s": time.perf_counter() - t_start,
    }
    print(
        f"total wall time {result['wall_s']:.0f} s; load average at end {machine['loadavg_at_end']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(render_markdown(result))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
