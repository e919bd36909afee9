"""Command-line glue for ``metagrad check`` (imported only by ``metagrad.cli``)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.algorithms import ANIL, MAML, MAMLpp, MetaSGD
from metagrad.check._check import check_meta_gradient
from metagrad.models import conv4, load_factory, sinusoid_mlp

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "mamlpp")


def _tasks(args: argparse.Namespace, model: nn.Module, gen: torch.Generator) -> tuple[Tensor, ...]:
    T, K, Q = args.tasks, args.shots, args.queries
    f64 = torch.float64
    if args.model == "mlp":
        amp = torch.empty(T, 1, 1, dtype=f64).uniform_(0.1, 5.0, generator=gen)
        phase = torch.empty(T, 1, 1, dtype=f64).uniform_(0.0, math.pi, generator=gen)
        xs = torch.empty(T, K, 1, dtype=f64).uniform_(-5, 5, generator=gen)
        xq = torch.empty(T, Q, 1, dtype=f64).uniform_(-5, 5, generator=gen)
        return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)
    shape = (
        tuple(args.input_shape)
        if args.input_shape
        else ((1, 28, 28) if args.model == "conv4" else None)
    )
    if shape is None:
        raise ValueError(
            "--input-shape is required with a custom --model (e.g. --input-shape 3,32,32)."
        )
    classes = args.classes if args.classes else (args.ways if args.model == "conv4" else 0)
    xs = torch.randn(T, K * max(classes, 1), *shape, generator=gen, dtype=f64)
    xq = torch.randn(T, Q * max(classes, 1), *shape, generator=gen, dtype=f64)
    if classes:
        ys = torch.arange(classes).repeat_interleave(K).expand(T, -1).contiguous()
        yq = torch.arange(classes).repeat_interleave(Q).expand(T, -1).contiguous()
        return xs, ys, xq, yq
    with torch.no_grad():
        out_shape = model(xs[0]).shape[1:]
    return (
        xs,
        torch.randn(T, xs.shape[1], *out_shape, generator=gen, dtype=f64),
        xq,
        torch.randn(T, xq.shape[1], *out_shape, generator=gen, dtype=f64),
    )


def build_learner(
    args: argparse.Namespace, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> MAML:
    kw = dict(inner_lr=args.inner_lr, inner_steps=args.inner_steps, strategy=args.strategy)
    if args.algorithm == "maml":
        return MAML(model, loss_fn, order=2, **kw)  # type: ignore[arg-type]
    if args.algorithm == "fomaml":
        return MAML(model, loss_fn, order=1, **kw)  # type: ignore[arg-type]
    if args.algorithm == "metasgd":
        return MetaSGD(model, loss_fn, **kw)  # type: ignore[arg-type]
    if args.algorithm == "anil":
        head = args.head or [n for n, _ in model.named_parameters()][-1].rsplit(".", 1)[0]
        return ANIL(model, loss_fn, head=head, **kw)  # type: ignore[arg-type]
    return MAMLpp(model, loss_fn, first_order_steps=0, **kw)  # type: ignore[arg-type]


def run_check(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.model == "mlp":
        model: nn.Module = sinusoid_mlp()
    elif args.model == "conv4":
        model = conv4(n_way=args.ways, hidden=args.hidden)
    else:
        model = load_factory(args.model)()
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"--model {args.model!r} returned {type(model).__name__}, not an nn.Module."
            )
    model = model.double()
    tasks = [t.double() if t.is_floating_point() else t for t in _tasks(args, model, gen)]
    classification = not tasks[1].is_floating_point()
    loss_fn = F.cross_entropy if classification else F.mse_loss
    learner = build_learner(args, model, loss_fn)
    report = check_meta_gradient(learner, *tasks, directions=args.directions, seed=args.seed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else str(report))
    return 0 if report.passed else 1
