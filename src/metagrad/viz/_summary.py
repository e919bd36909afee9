"""Summarize large meta-graphs by merging nodes that belong to the same module and phase."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from metagrad.viz._graph import (
    DETACHED,
    EXTRA,
    FAST,
    OP,
    PARAM,
    GraphNode,
    MetaGraph,
)

__all__ = ["summarize"]

_Key = tuple[object, ...]
_FN = "metagrad.viz.summarize"


def _key_ops(n: GraphNode) -> _Key:
    """Level 1: ops merged per (phase, module); named tensors kept."""
    if n.kind == OP:
        return (OP, n.phase, n.module, n.second_order)
    return (n.id,)


def _key_tensors(n: GraphNode) -> _Key:
    """Level 2: also parameters / fast weights / detached gradients merged per module."""
    if n.kind in (PARAM, EXTRA):
        return (n.kind, n.module)
    if n.kind in (FAST, DETACHED):
        return (n.kind, n.module, n.step)
    return _key_ops(n)


def _key_phase(n: GraphNode) -> _Key:
    """Level 3: one node per phase and kind (the whole model collapsed)."""
    if n.kind == OP:
        return (OP, n.phase, n.second_order)
    if n.kind in (PARAM, EXTRA):
        return (n.kind,)
    if n.kind in (FAST, DETACHED):
        return (n.kind, n.step)
    return (n.id,)


_LEVELS: tuple[Callable[[GraphNode], _Key], ...] = (_key_ops, _key_tensors, _key_phase)


def _group_label(members: list[GraphNode]) -> str:
    first = members[0]
    where = first.module or "model"
    if len({m.module for m in members}) > 1:
        where = "model"
    if first.kind == OP:
        ops = Counter(op.replace("Backward", "Bw") for m in members for op in m.ops)
        top = ", ".join(name for name, _ in ops.most_common(3))
        more = ", ..." if len(ops) > 3 else ""
        total = sum(ops.values())
        return f"{where} | {first.phase}\n{total} ops: {top}{more}"
    names = [m.label.split("\n", 1)[0].split(":", 1)[0] for m in members]
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
    what = {
        PARAM: "meta-parameters",
        EXTRA: "learned (meta-parameters)",
        FAST: f"fast weights, step {first.step}",
        DETACHED: "detached inner gradients",
    }.get(first.kind, first.kind)
    return f"{shown}\n{what}"


def _merge(graph: MetaGraph, key: Callable[[GraphNode], _Key], level: int) -> MetaGraph:
    groups: dict[_Key, list[GraphNode]] = {}
    for n in graph.nodes.values():
        groups.setdefault(key(n), []).append(n)
    where: dict[str, str] = {}
    nodes: dict[str, GraphNode] = {}
    for k, (_, members) in enumerate(groups.items()):
        first = members[0]
        if len(members) == 1:
            nodes[first.id] = first
            where[first.id] = first.id
            continue
        gid = f"g{level}_{k}"
        nodes[gid] = GraphNode(
            gid,
            first.kind,
            _group_label(members),
            any(m.second_order for m in members),
            first.phase,
            first.module if len({m.module for m in members}) == 1 else "",
            first.step,
            [op for m in members for op in m.ops],
        )
        for m in members:
            where[m.id] = gid
    edges: dict[tuple[str, str], bool] = {}
    for (src, dst), red in graph.edges.items():
        a, b = where[src], where[dst]
        if a != b:
            edges[(a, b)] = edges.get((a, b), False) or red
    extra = list(dict.fromkeys((where[a], where[b]) for a, b in graph.extra_edges))
    return MetaGraph(nodes, edges, extra, graph.order, graph.title, level)


def summarize(graph: MetaGraph, max_nodes: int = 60) -> MetaGraph:
    """Collapse ``graph`` until it has at most ``max_nodes`` nodes (or cannot shrink further).

    Level 1 merges the ops of one module in one phase (support forward of step k, inner gradient
    of step k, update k, query forward) into one box listing the most frequent op names; level 2
    also merges each module's parameters and fast weights; level 3 keeps one box per phase. A
    merged box is second order if any of its members is.

    Args:
        graph: From :func:`metagrad.viz.meta_graph`.
        max_nodes: Node budget (>= 1).

    Returns:
        The least summarized graph within budget (``graph`` itself if it already fits), else the
        most summarized one. ``MetaGraph.summary`` says which level was applied.

    Raises:
        ValueError: ``max_nodes`` is not a positive int.
    """
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
        raise ValueError(f"{_FN}: max_nodes={max_nodes!r} must be an int >= 1 (e.g. 60).")
    out = graph
    for level, key in enumerate(_LEVELS, start=1):
        if out.count() <= max_nodes:
            return out
        out = _merge(graph, key, level)
    return out
