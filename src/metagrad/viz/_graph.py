"""Capture the autograd graph of one task's meta-loss and classify every node by provenance.

PyTorch gives nodes of a backward-of-backward graph ordinary names: differentiating
``autograd.grad(create_graph=True)`` records the derivative formulas as ordinary ops
(``MulBackward0``, ``MmBackward0``, ``TBackward0``, ``PowBackward0``...). Only ops whose backward is
a dedicated ATen kernel show it in the name (``MseLossBackwardBackward0``,
``ConvolutionBackwardBackward0``, ``ThresholdBackwardBackward0``). Names are therefore useless for
finding the second-order part; this module finds it by *provenance*: the inner loop is run by the
engine (:func:`metagrad.algorithms._task.run_task`) with a recording gradient backend, and the
nodes reachable from the inner gradients but not from the support loss or the parameters are
exactly those ``create_graph=True`` added. They are the paths first-order MAML drops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.algorithms._base import UnrolledLearner, check_steps
from metagrad.algorithms._task import InnerSpec, run_task, task_problem
from metagrad.bilevel._inner import AutogradBackend, GradBackend
from metagrad.functional._checks import check_task

__all__ = ["GraphNode", "MetaGraph", "meta_graph"]

_FN = "metagrad.viz.meta_graph"

Node = torch.autograd.graph.Node

# Node kinds, also used by the DOT writer for styling.
PARAM, EXTRA, FAST, SUPPORT_LOSS, QUERY_LOSS, OP, DETACHED = (
    "param",
    "extra",
    "fast",
    "support_loss",
    "query_loss",
    "op",
    "detached",
)


@dataclass
class GraphNode:
    """One node of a drawn meta-graph (an autograd node or a summary of several).

    Attributes:
        id: Unique DOT identifier.
        kind: ``"param"``, ``"extra"`` (learned inner rate...), ``"fast"`` (fast weight),
            ``"support_loss"``, ``"query_loss"``, ``"op"`` or ``"detached"`` (the constant
            inner gradient of first-order MAML, drawn as a placeholder).
        label: Text drawn in the node.
        second_order: True when the node exists only because of ``create_graph=True``.
        phase: ``"support k"``, ``"inner grad k"``, ``"update k"`` or ``"query"``.
        module: Module prefix the node is attributed to (``""`` for the top level).
        step: Inner step for per-step nodes, else ``None``.
        ops: Autograd class names this node stands for (one, or many once summarized).
    """

    id: str
    kind: str
    label: str
    second_order: bool = False
    phase: str = "query"
    module: str = ""
    step: int | None = None
    ops: list[str] = field(default_factory=list)


@dataclass
class MetaGraph:
    """The autograd graph of one task's meta-loss, ready to be written as DOT.

    Edges point along the data flow (input -> consumer), the reverse of ``next_functions``.

    Attributes:
        nodes: Nodes by id, in a deterministic order.
        edges: ``(src, dst) -> second_order`` (True when the edge exists only because of
            ``create_graph=True``).
        extra_edges: Non-autograd edges drawn dashed (support loss -> detached gradient).
        order: 1 (first-order MAML) or 2 (exact second order).
        title: Caption of the drawing.
        summary: Summarization level applied (0: none).
    """

    nodes: dict[str, GraphNode]
    edges: dict[tuple[str, str], bool]
    extra_edges: list[tuple[str, str]]
    order: int
    title: str
    summary: int = 0

    def second_order_ops(self) -> list[str]:
        """Autograd class names of the nodes that only ``create_graph=True`` creates."""
        return sorted(op for n in self.nodes.values() if n.second_order for op in n.ops)

    def count(self) -> int:
        """Number of drawn nodes."""
        return len(self.nodes)


def _walk(roots: Iterable[Node | None]) -> dict[int, Node]:
    """Every node reachable from ``roots`` through ``next_functions``, keyed by ``id``."""
    seen: dict[int, Node] = {}
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return seen


def _fns(tensors: Iterable[Tensor]) -> list[Node | None]:
    return [t.grad_fn for t in tensors]


def _postorder(roots: list[Node]) -> list[Node]:
    """Nodes in topological order, inputs before their consumers (iterative DFS)."""
    out: list[Node] = []
    done: set[int] = set()
    for root in roots:
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                out.append(node)
                continue
            if id(node) in done:
                continue
            done.add(id(node))
            stack.append((node, True))
            for nxt, _ in reversed(node.next_functions):
                if nxt is not None and id(nxt) not in done:
                    stack.append((nxt, False))
    return out


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _fast_label(name: str, step: int) -> str:
    """``w`` after step 1 is ``w1`` (the toy's notation); dotted names keep the full name."""
    if name.isidentifier() and not name[-1].isdigit():
        return f"{name}{step}"
    return name


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


@dataclass
class _StepRecord:
    step: int
    params: Params
    loss: Tensor
    grads: Params


class _RecordingBackend(GradBackend):
    """Wraps the engine's autograd backend and keeps each step's tensors for classification."""

    def __init__(self, inner: GradBackend) -> None:
        self.inner = inner
        self.records: list[_StepRecord] = []

    def __call__(
        self, f: Callable[[Params], Tensor], params: Params, step: int
    ) -> tuple[Params, Tensor]:
        grads, loss = self.inner(f, params, step)
        self.records.append(_StepRecord(step, dict(params), loss, dict(grads)))
        return grads, loss


def meta_graph(
    learner: UnrolledLearner,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    *,
    order: int | None = None,
    steps: int | None = None,
    title: str | None = None,
) -> MetaGraph:
    r"""Autograd graph of one task's meta-loss, nodes labelled and second-order paths marked.

    The inner loop is the learner's own (its optimizer, learned rates, adapted subset), run by
    the engine for a single task with ``create_graph = (order == 2)``. The drawn roots are the
    query loss (the meta-loss) and each inner step's support loss.

    Args:
        learner: A :class:`metagrad.algorithms.MAML` (or relative) wrapping the model.
        xs: Support inputs of one task ``[K, ...]``; ys: support targets ``[K, ...]``.
        xq: Query inputs ``[Q, ...]``; yq: query targets ``[Q, ...]``.
        order: 1 or 2 (default: the learner's current order).
        steps: Inner steps (default: the learner's ``inner_steps``).
        title: Caption (default names the order).

    Returns:
        A :class:`MetaGraph`; write it with :func:`metagrad.viz.to_dot`.

    Raises:
        TypeError: ``learner`` is not a metagrad learner.
        ValueError: Bad ``order``/``steps`` or malformed task tensors.

    Example:
        >>> import torch, metagrad.viz as viz
        >>> from metagrad.algorithms import MAML
        >>> learner = MAML(torch.nn.Linear(1, 1), torch.nn.functional.mse_loss, 0.1, 1)
        >>> x = torch.randn(3, 1)
        >>> g2 = viz.meta_graph(learner, x, x, x, x, order=2)
        >>> g1 = viz.meta_graph(learner, x, x, x, x, order=1)
        >>> bool(g2.second_order_ops()), bool(g1.second_order_ops())
        (True, False)
    """
    if not isinstance(learner, UnrolledLearner):
        raise TypeError(
            f"{_FN}: learner must be a metagrad learner such as metagrad.algorithms.MAML(model, "
            f"loss_fn, inner_lr, inner_steps), got {type(learner).__name__}."
        )
    if order is None:
        order = learner.current_order()
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"{_FN}: order={order!r} must be 1 (first-order MAML) or 2 (exact).")
    if steps is None:
        steps = int(getattr(learner, "inner_steps", 1))
    steps = check_steps(_FN, "steps", steps)
    first = next(iter(learner.fmodel.params().values()))
    dtype, device = first.dtype, first.device
    xs, ys = check_task(f"{_FN} (support)", xs, ys, dtype, device)
    xq, yq = check_task(f"{_FN} (query)", xq, yq, dtype, device)
    spec: InnerSpec = learner.inner_spec(steps, order, training=True)
    theta = learner.fmodel.params()
    extra = learner.extra_params()
    problem = task_problem(spec, learner.objective)
    backend = _RecordingBackend(AutogradBackend(problem, 0, create_graph=order == 2))
    learner.fmodel.sync_modes()
    with torch.enable_grad():
        objective, final = run_task(
            learner.objective, spec, backend, theta, extra, learner.fmodel.buffers(), xs, ys, xq, yq
        )
    assert objective is not None  # xq was given
    if title is None:
        title = (
            "second-order MAML (create_graph=True)"
            if order == 2
            else "first-order MAML (create_graph=False)"
        )
    return _classify(objective, final, backend.records, theta, extra, spec, order, title)


_Named = dict[int, tuple[str, str, str, int | None]]
"""Named nodes by ``id``: (kind, label, parameter name, step)."""


def _classify(
    objective: Tensor,
    final: Params,
    records: list[_StepRecord],
    theta: Params,
    extra: Params,
    spec: InnerSpec,
    order: int,
    title: str,
) -> MetaGraph:
    roots = [objective.grad_fn] + [r.loss.grad_fn for r in records]
    live = [r for r in roots if r is not None]
    everything = _walk(live)
    topo = _postorder(live)
    after = [r.params for r in records[1:]] + [final]
    named = _named_nodes(everything, objective, records, after, theta, extra, spec)
    phase, second = _phases(records, after, topo, named)
    module = _modules(topo, named)
    ids = {id(node): f"n{k}" for k, node in enumerate(topo)}
    nodes, edges = _nodes_and_edges(objective, topo, ids, named, phase, second, module)
    extra_edges: list[tuple[str, str]] = []
    if order == 1:
        extra_edges = _cut_gradients(records, everything, ids, named, nodes, edges)
    return MetaGraph(nodes, edges, extra_edges, order, title)


def _named_nodes(
    everything: dict[int, Node],
    objective: Tensor,
    records: list[_StepRecord],
    after: list[Params],
    theta: Params,
    extra: Params,
    spec: InnerSpec,
) -> _Named:
    """Meta-parameters, fast weights of each step, support losses and the meta-loss."""
    leaf_names = {id(t): (PARAM, n) for n, t in theta.items()}
    leaf_names.update({id(t): (EXTRA, n) for n, t in extra.items()})

    named: _Named = {}
    for node in everything.values():
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            kind, name = leaf_names.get(id(var), (PARAM, "leaf"))
            sub = "learned (meta-parameter)" if kind == EXTRA else "meta-parameter"
            named[id(node)] = (kind, f"{name}\n{sub} {_shape(var)}", name, None)
    for k, params in enumerate(after, start=1):
        for n in spec.adapt_names:
            fn = params[n].grad_fn
            if fn is not None and id(fn) not in named:
                named[id(fn)] = (
                    FAST,
                    f"{_fast_label(n, k)}: fast weight, step {k}\n({fn.name()})",
                    n,
                    k,
                )
    for r in records:
        fn = r.loss.grad_fn
        if fn is not None:
            label = f"L_s support loss, step {r.step}\n({fn.name()})"
            named[id(fn)] = (SUPPORT_LOSS, label, "", r.step)
    if objective.grad_fn is not None:
        label = f"L_q query loss = meta-loss\n({objective.grad_fn.name()})"
        if spec.step_weights is not None:
            label = f"meta-loss: weighted query losses\n({objective.grad_fn.name()})"
        named[id(objective.grad_fn)] = (QUERY_LOSS, label, "", None)

    return named


def _phases(
    records: list[_StepRecord], after: list[Params], topo: list[Node], named: _Named
) -> tuple[dict[int, tuple[str, int | None]], set[int]]:
    """Each op's phase by provenance, and the set of second-order (create_graph) ops."""
    phase: dict[int, tuple[str, int | None]] = {}
    second: set[int] = set()
    for k, r in enumerate(records):
        fwd = _walk([r.loss.grad_fn])
        base = set(_walk(_fns(r.params.values())))
        for i in fwd:
            phase.setdefault(i, (f"support {k}", k))
        for i in set(_walk(_fns(r.grads.values()))) - set(fwd) - base:
            phase.setdefault(i, (f"inner grad {k}", k))
            second.add(i)
        for i in set(_walk(_fns(after[k].values()))) - base - set(fwd):
            phase.setdefault(i, (f"update {k}", k))
    # Update ops fed by the inner gradient's graph (lr * g, Adam moments...) are second order too.
    for node in topo:
        i = id(node)
        if i in named or i in second or phase.get(i, ("", None))[0].startswith("support"):
            continue
        if any(nxt is not None and id(nxt) in second for nxt, _ in node.next_functions):
            second.add(i)

    return phase, second


def _modules(topo: list[Node], named: _Named) -> dict[int, str]:
    """Module attribution: named nodes by their parameter; ops inherit from a (named) input."""
    module: dict[int, str] = {}
    for node in topo:
        i = id(node)
        if i in named and named[i][2]:
            module[i] = _module_of(named[i][2])
            continue
        inputs = [nxt for nxt, _ in node.next_functions if nxt is not None]
        pick = [id(n) for n in inputs if id(n) in named and named[id(n)][2]] or [
            id(n) for n in inputs if id(n) in module
        ]
        module[i] = module[pick[0]] if pick else ""

    return module


def _nodes_and_edges(
    objective: Tensor,
    topo: list[Node],
    ids: dict[int, str],
    named: _Named,
    phase: dict[int, tuple[str, int | None]],
    second: set[int],
    module: dict[int, str],
) -> tuple[dict[str, GraphNode], dict[tuple[str, str], bool]]:
    """Graph nodes (ops and named nodes) and edges, each marked second order or not."""
    nodes: dict[str, GraphNode] = {}
    for node in topo:
        i = id(node)
        ph, step = phase.get(i, ("query", None))
        if i in named:
            kind, label, _, nstep = named[i]
            nodes[ids[i]] = GraphNode(
                ids[i], kind, label, False, ph, module[i], nstep, [node.name()]
            )
        else:
            nodes[ids[i]] = GraphNode(
                ids[i], OP, node.name(), i in second, ph, module[i], step, [node.name()]
            )
    # An edge is second order when it touches a create_graph node, or when it feeds a support
    # forward op that the meta-loss reaches (only possible through the inner gradient's graph).
    meta_reach = set(_walk([objective.grad_fn]))
    edges: dict[tuple[str, str], bool] = {}
    for node in topo:
        reused = id(node) in meta_reach and phase.get(id(node), ("",))[0].startswith("support")
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            src, dst = ids[id(nxt)], ids[id(node)]
            edges[(src, dst)] = nodes[src].second_order or nodes[dst].second_order or reused

    return nodes, edges


def _cut_gradients(
    records: list[_StepRecord],
    everything: dict[int, Node],
    ids: dict[int, str],
    named: _Named,
    nodes: dict[str, GraphNode],
    edges: dict[tuple[str, str], bool],
) -> list[tuple[str, str]]:
    """First order: the inner gradient enters the update as a constant; draw where it was cut."""
    extra_edges: list[tuple[str, str]] = []
    loss_ids = {r.step: ids[id(r.loss.grad_fn)] for r in records if r.loss.grad_fn}
    for i, (kind, _, name, step) in named.items():
        if kind != FAST or step is None or i not in ids:
            continue
        fast = everything[i]
        if any(nxt is None for nxt, _ in fast.next_functions):
            pid = f"{ids[i]}_g"
            nodes[pid] = GraphNode(
                pid,
                DETACHED,
                f"dL_s/d{name} (step {step - 1})\nconstant: detached",
                False,
                f"update {step - 1}",
                _module_of(name),
                step,
                ["detached"],
            )
            edges[(pid, ids[i])] = False
            if step - 1 in loss_ids:
                extra_edges.append((loss_ids[step - 1], pid))
    return extra_edges
