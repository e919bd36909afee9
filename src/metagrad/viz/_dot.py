"""Write meta-graphs as Graphviz DOT (pure Python) and render them with the ``dot`` binary."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from metagrad.viz._graph import (
    DETACHED,
    EXTRA,
    FAST,
    OP,
    PARAM,
    QUERY_LOSS,
    SUPPORT_LOSS,
    GraphNode,
    MetaGraph,
)
from metagrad.viz._summary import summarize

__all__ = ["FORMATS", "GraphvizNotFoundError", "render", "to_dot"]

FORMATS = ("dot", "svg", "png")
RED = "#d00000"
_INSTALL = (
    "install Graphviz (apt-get install graphviz / brew install graphviz / "
    "conda install graphviz) so that `dot` is on PATH, or use --format dot"
)

_STYLE = {
    PARAM: 'shape=box, style="rounded,filled", fillcolor="#cfe2ff", color="#3d6bb3"',
    EXTRA: 'shape=box, style="rounded,filled", fillcolor="#e3d7f7", color="#6a4bb3"',
    FAST: 'shape=box, style="rounded,filled", fillcolor="#ffe39a", color="#b38600"',
    SUPPORT_LOSS: 'shape=box, style="filled", fillcolor="#d4f0cf", color="#3c8d2f"',
    QUERY_LOSS: 'shape=box, style="filled", fillcolor="#a9e0a0", color="#2d6b22", peripheries=2',
    OP: 'shape=ellipse, style="filled", fillcolor="#f2f2f2", color="#888888"',
    DETACHED: 'shape=box, style="dashed", color="#999999", fontcolor="#666666"',
}
_SECOND = f'shape=ellipse, style="filled", fillcolor="#ffd5d5", color="{RED}", fontcolor="#a00000"'


class GraphvizNotFoundError(RuntimeError):
    """Raised when SVG/PNG output is asked for and Graphviz's ``dot`` is not installed."""


def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become centered line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_line(n: GraphNode, prefix: str) -> str:
    style = _SECOND if n.kind == OP and n.second_order else _STYLE.get(n.kind, _STYLE[OP])
    if n.kind == OP and len(n.ops) > 1:
        style = style.replace("shape=ellipse", "shape=box")
        if n.second_order:
            style += ", penwidth=1.5"
    return f"    {prefix}{n.id} [label={_q(n.label)}, {style}];"


def _body(graph: MetaGraph, prefix: str) -> list[str]:
    lines = [_node_line(n, prefix) for n in graph.nodes.values()]
    for (src, dst), red in graph.edges.items():
        attrs = f' [color="{RED}", penwidth=2.2]' if red else ' [color="#555555"]'
        lines.append(f"    {prefix}{src} -> {prefix}{dst}{attrs};")
    for src, dst in graph.extra_edges:
        lines.append(
            f'    {prefix}{src} -> {prefix}{dst} [style=dashed, color="#999999", '
            f'fontcolor="#777777", fontsize=8, label="autograd.grad\\n(create_graph=False)"];'
        )
    return lines


def _legend(order_1: bool, order_2: bool) -> list[str]:
    rows = [
        ("#cfe2ff", "#000000", "w", "meta-parameter (leaf, AccumulateGrad)"),
        ("#ffe39a", "#000000", "w1", "fast weight after an inner step"),
        ("#d4f0cf", "#000000", "L_s / L_q", "support loss / query loss (meta-loss)"),
        ("#f2f2f2", "#000000", "MmBackward0", "autograd op (grad_fn)"),
    ]
    if order_2:
        rows.append(
            (
                "#ffd5d5",
                "#a00000",
                "TBackward0",
                "exists only with create_graph=True: the gradient-of-gradient path",
            )
        )
    cells = "".join(
        f'<TR><TD BGCOLOR="{bg}"><FONT COLOR="{fg}">{k}</FONT></TD>'
        f'<TD ALIGN="LEFT">{text}</TD></TR>'
        for bg, fg, k, text in rows
    )
    if order_2:
        cells += (
            f'<TR><TD><FONT COLOR="{RED}"><B>red edge</B></FONT></TD>'
            '<TD ALIGN="LEFT">path of the meta-gradient that first-order MAML drops</TD></TR>'
        )
    if order_1:
        cells += (
            '<TR><TD><FONT COLOR="#777777">dashed</FONT></TD>'
            '<TD ALIGN="LEFT">inner gradient used as a constant (first order)</TD></TR>'
        )
    table = (
        '<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">'
        f'<TR><TD COLSPAN="2"><B>legend</B></TD></TR>{cells}</TABLE>>'
    )
    return [f"  legend [shape=plaintext, fontsize=9, label={table}];", "  { rank=sink; legend; }"]


def to_dot(
    graphs: MetaGraph | Sequence[MetaGraph],
    *,
    max_nodes: int | None = None,
    title: str | None = None,
    legend: bool = True,
) -> str:
    """DOT source for one meta-graph, or several side by side (one cluster each).

    Args:
        graphs: A :class:`MetaGraph` or a sequence of them (e.g. order 1 and order 2).
        max_nodes: Summarize each graph to at most this many nodes (see
            :func:`metagrad.viz.summarize`); ``None`` draws every autograd node.
        title: Caption of the whole drawing (default: the graph's own title).
        legend: Draw the colour legend.

    Returns:
        The DOT source (render with ``dot -Tpng`` or :func:`metagrad.viz.render`).

    Example:
        >>> import torch, metagrad.viz as viz
        >>> dot = viz.to_dot([viz.toy_graph(order=1), viz.toy_graph(order=2)])
        >>> dot.count("subgraph cluster_")
        2
    """
    items = [graphs] if isinstance(graphs, MetaGraph) else list(graphs)
    if not items or not all(isinstance(g, MetaGraph) for g in items):
        raise TypeError(
            "metagrad.viz.to_dot: graphs must be a MetaGraph or a non-empty sequence of them "
            "(from metagrad.viz.meta_graph or toy_graph)."
        )
    if max_nodes is not None:
        items = [summarize(g, max_nodes) for g in items]
    if title is None:
        title = (
            items[0].title
            if len(items) == 1
            else "meta-loss graph: " + " vs ".join(f"order {g.order}" for g in items)
        )
    lines = [
        "digraph metagrad {",
        f"  graph [label={_q(title)}, labelloc=t, fontsize=14, fontname=Helvetica, "
        "rankdir=TB, nodesep=0.25, ranksep=0.3, newrank=true];",
        '  node [fontname=Helvetica, fontsize=10, margin="0.08,0.03"];',
        "  edge [arrowsize=0.6, fontname=Helvetica];",
    ]
    if len(items) == 1:
        lines += _body(items[0], "")
    else:
        for k, g in enumerate(items, start=1):
            lines.append(f"  subgraph cluster_{k} {{")
            lines.append(f'    label={_q(g.title)}; fontsize=12; style=rounded; color="#bbbbbb";')
            lines += _body(g, f"c{k}_")
            lines.append("  }")
    if legend:
        lines += _legend(any(g.order == 1 for g in items), any(g.order == 2 for g in items))
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(source: str, path: str | Path, fmt: str | None = None) -> Path:
    """Write DOT ``source`` to ``path`` as DOT, SVG or PNG (the last two need Graphviz).

    Args:
        source: DOT text from :func:`to_dot`.
        path: Output file.
        fmt: ``"dot"``, ``"svg"`` or ``"png"`` (default: from the file suffix, else ``"dot"``).

    Returns:
        The written path.

    Raises:
        ValueError: Unknown format.
        GraphvizNotFoundError: SVG/PNG asked for but ``dot`` is not on PATH.
        RuntimeError: ``dot`` failed.
    """
    out = Path(path)
    if fmt is None:
        fmt = out.suffix.lstrip(".").lower() or "dot"
        fmt = "dot" if fmt == "gv" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"metagrad.viz.render: fmt={fmt!r} is not one of {FORMATS}.")
    if fmt == "dot":
        out.write_text(source, encoding="utf-8")
        return out
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizNotFoundError(
            f"metagrad.viz.render: writing {fmt.upper()} needs Graphviz's `dot` program, which "
            f"was not found; {_INSTALL}."
        )
    proc = subprocess.run(
        [exe, f"-T{fmt}", "-o", str(out)],
        input=source.encode("utf-8"),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"metagrad.viz.render: `dot -T{fmt}` failed: {proc.stderr.decode(errors='replace')}"
        )
    return out
