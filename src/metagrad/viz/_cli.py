"""The ``metagrad graph`` subcommand: draw the autograd graph of a meta-loss.

Registered by :func:`add_graph_parser`; the handler is set both as ``handler`` (what
``metagrad.cli.main`` dispatches on) and ``func``, and returns the exit status.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagrad._argtypes import finite_float, int_at_least, nonneg_float, shape, xy_pair
from metagrad.algorithms import ANIL, MAML, MAMLpp, MetaSGD
from metagrad.viz._dot import FORMATS, GraphvizNotFoundError, render, to_dot
from metagrad.viz._graph import MetaGraph, meta_graph
from metagrad.viz._models import conv4, load_factory, mlp, regression_task, toy_graph

__all__ = ["add_graph_parser", "run_graph"]

_ALGORITHMS = ("maml", "metasgd", "mamlpp", "anil")
_EPILOG = """examples:
  metagrad graph --toy --order both --format png --output maml_graph.png
  metagrad graph --toy --order 1 --support 1,0 --query 2,0 --inner-lr 0.5
  metagrad graph --model conv4 --filters 8 --order 2 --max-nodes 60 --output conv4.dot
  metagrad graph --model mypkg.nets:make_net --input-shape 3,32,32 --loss ce --algorithm metasgd

Red nodes and edges exist only with create_graph=True (second order): the
gradient-of-gradient paths that first-order MAML drops."""


_count = int_at_least(0)


def add_graph_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``graph`` subcommand on ``subparsers`` (from ``add_subparsers``).

    Args:
        subparsers: The parent parser's subparsers action.
    """
    p = subparsers.add_parser(
        "graph",
        help="draw the autograd graph of a meta-loss (second-order paths in red)",
        description=(
            "Render the autograd graph of one task's meta-loss as DOT (always), SVG or PNG "
            "(with Graphviz's `dot`). Parameters, fast weights and losses are labelled; the "
            "nodes and edges that exist only because of create_graph=True (the "
            "gradient-of-gradient paths first-order MAML drops) are red. Negative values: "
            "--w0=-0.5."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--toy", action="store_true", help="the linear y = w*x + b toy (default without --model)"
    )
    what.add_argument(
        "--model", metavar="NAME", help="mlp, conv4, or module:function returning an nn.Module"
    )
    p.add_argument("--order", choices=("1", "2", "both"), default="both")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: --output suffix")
    p.add_argument("--output", "-o", metavar="FILE", help="output file (DOT goes to stdout)")
    p.add_argument(
        "--max-nodes",
        type=_count,
        default=60,
        help="summarize graphs above this many nodes by module and phase; 0 draws all (60)",
    )
    toy = p.add_argument_group("toy (same flags as `metagrad explain`)")
    toy.add_argument("--w0", type=finite_float, default=-0.5258)
    toy.add_argument("--b0", type=finite_float, default=0.0)
    toy.add_argument("--support", type=xy_pair, default=(1.0, 0.0), metavar="X,Y")
    toy.add_argument("--query", type=xy_pair, default=(2.0, 0.0), metavar="X,Y")
    toy.add_argument("--inner-lr", type=nonneg_float, default=None, help="toy 1.0, models 0.1")
    model = p.add_argument_group("models")
    model.add_argument("--algorithm", choices=_ALGORITHMS, default="maml")
    model.add_argument("--steps", type=_count, default=1, help="inner steps (1)")
    model.add_argument("--shots", type=_count, default=None, help="support = query size")
    model.add_argument("--filters", type=_count, default=32, help="conv4 channels (32)")
    model.add_argument("--ways", type=_count, default=5, help="conv4 classes (5)")
    model.add_argument("--image-size", type=_count, default=28, help="conv4 input side (28)")
    model.add_argument("--channels", type=_count, default=1, help="conv4 input channels (1)")
    model.add_argument("--input-shape", type=shape, default=(1,), metavar="D1,D2,...")
    model.add_argument("--loss", choices=("mse", "ce"), default="mse", help="for module:fn")
    model.add_argument("--seed", type=int_at_least(0), default=0)
    handler = functools.partial(run_graph, parser=p)
    p.set_defaults(handler=handler, func=handler)


def _learner(args: argparse.Namespace, order: int) -> tuple[Any, tuple[torch.Tensor, ...]]:
    torch.manual_seed(args.seed)
    classes: int | None = None
    net: nn.Module
    shape: tuple[int, ...]
    if args.model == "mlp":
        net, shape, shots = mlp(), (1,), args.shots or 5
    elif args.model == "conv4":
        if min(args.filters, args.ways, args.image_size, args.channels) < 1:
            raise ValueError("--filters, --ways, --image-size and --channels must be >= 1")
        net = conv4(
            n_way=args.ways, in_channels=args.channels, hidden=args.filters,
            image_size=args.image_size,
        )  # fmt: skip
        shape = (args.channels, args.image_size, args.image_size)
        shots, classes = (args.shots or 1) * args.ways, args.ways
    else:
        built = load_factory(args.model)()
        if not isinstance(built, nn.Module):
            raise ValueError(
                f"model factory {args.model!r} returned {type(built).__name__}, not an nn.Module"
            )
        net, shape, shots = built, args.input_shape, args.shots or 5
        if args.loss == "ce":
            with torch.no_grad():
                out = net(torch.randn(1, *shape, dtype=next(net.parameters()).dtype))
            classes = int(out.shape[-1])
    if shots < 1:
        raise ValueError("--shots must be >= 1")
    xs, ys, xq, yq, loss_fn = regression_task(net, shape, shots, classes)
    lr = 0.1 if args.inner_lr is None else args.inner_lr
    cls = {"maml": MAML, "metasgd": MetaSGD, "mamlpp": MAMLpp}.get(args.algorithm)
    if cls is not None:
        learner = cls(net, loss_fn, lr, args.steps, order)
    else:
        last = [n for n, _ in net.named_parameters()][-1]
        learner = ANIL(net, loss_fn, last.rsplit(".", 1)[0], lr, args.steps, order)
    return learner, (xs, ys, xq, yq)


def _graphs(args: argparse.Namespace) -> list[MetaGraph]:
    orders = {"1": (1,), "2": (2,), "both": (1, 2)}[args.order]
    if args.model is None:
        lr = 1.0 if args.inner_lr is None else args.inner_lr
        return [
            toy_graph(
                args.w0,
                args.b0,
                support=args.support,
                query=args.query,
                inner_lr=lr,
                order=o,
                steps=args.steps,
            )
            for o in orders
        ]
    out = []
    for o in orders:
        learner, task = _learner(args, o)
        name = f"{args.algorithm} on {args.model}, order {o}"
        flag = "create_graph=True" if o == 2 else "create_graph=False"
        out.append(meta_graph(learner, *task, order=o, steps=args.steps, title=f"{name} ({flag})"))
    return out


def run_graph(args: argparse.Namespace, *, parser: argparse.ArgumentParser | None = None) -> int:
    """Handler of ``metagrad graph``; returns 0, or 2 with a message on stderr for bad input."""
    fmt = args.format
    if fmt is None:
        suffix = Path(args.output).suffix.lstrip(".").lower() if args.output else ""
        fmt = suffix if suffix in FORMATS else "dot"
    try:
        if fmt != "dot" and not args.output:
            raise ValueError(f"--format {fmt} writes a binary file; pass --output FILE")
        graphs = _graphs(args)
        title = None
        if len(graphs) == 2:
            what = "y = w*x + b" if args.model is None else args.model
            title = f"MAML meta-loss graph of {what}: first order vs second order"
        source = to_dot(graphs, max_nodes=args.max_nodes or None, title=title)
        if args.output:
            render(source, args.output, fmt)
        else:
            sys.stdout.write(source)
    except (ValueError, TypeError, GraphvizNotFoundError, RuntimeError, OSError) as exc:
        print(f"metagrad graph: error: {exc}", file=sys.stderr)
        return 2
    return 0
