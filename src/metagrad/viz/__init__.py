"""Pictures of meta-learning: the autograd graph of a meta-loss and inner-loop adaptation curves.

``meta_graph`` records the graph that second-order MAML differentiates through and marks the
nodes that only ``create_graph=True`` creates (the gradient-of-gradient paths first-order MAML
drops); ``to_dot`` writes it as Graphviz DOT with no dependency, ``render`` calls Graphviz's
``dot`` for SVG/PNG. ``inner_trace`` records support/query losses, gradient norms and step sizes
per task and inner step; ``plot_trace`` draws them (needs ``pip install metagrad[viz]``).

The library core never imports this package.
"""

from __future__ import annotations

from metagrad.viz._dot import FORMATS, GraphvizNotFoundError, render, to_dot
from metagrad.viz._graph import GraphNode, MetaGraph, meta_graph
from metagrad.viz._models import ToyLinear, conv4, load_factory, mlp, squared_error, toy_graph
from metagrad.viz._summary import summarize
from metagrad.viz._trace import TRACE_KEYS, inner_trace, plot_trace, write_trace_csv

__all__ = [
    "FORMATS",
    "TRACE_KEYS",
    "GraphNode",
    "GraphvizNotFoundError",
    "MetaGraph",
    "ToyLinear",
    "conv4",
    "inner_trace",
    "load_factory",
    "meta_graph",
    "mlp",
    "plot_trace",
    "render",
    "squared_error",
    "summarize",
    "to_dot",
    "toy_graph",
    "write_trace_csv",
]
