"""The ``metagrad`` command line.

Each subcommand is registered by its own ``_add_<name>(subparsers)`` function, which builds the
subparser and sets ``handler`` (``Callable[[argparse.Namespace], int]``) as a default; ``main``
dispatches to it. Adding a subcommand means writing one ``_add_*`` function and listing it in
``_REGISTRARS``. The library core never imports this module.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import metagrad
from metagrad._argtypes import finite_float as _finite_float
from metagrad._argtypes import int_at_least
from metagrad._argtypes import nonneg_float as _nonneg_float
from metagrad._argtypes import shape as _int_list
from metagrad._argtypes import xy_pair as _xy_pair
from metagrad.algorithms._task import STRATEGIES
from metagrad.toy import ToyResult, linear_toy

_positive_int = int_at_least(1)

__all__ = ["build_parser", "main"]

# A long option followed by a value that looks like a negative number ("-1e-3", "-1,0"): argparse
# before 3.13 takes such a value for an option and fails, so main() glues it as "--flag=value".
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _glue_negative_values(argv: Sequence[str]) -> list[str]:
    """Rewrites ``--flag -1,0`` as ``--flag=-1,0`` so negative values parse on any Python."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (
            tok.startswith("--")
            and len(tok) > 2
            and "=" not in tok
            and nxt is not None
            and _NEGATIVE_VALUE.match(nxt)
        ):
            out.append(f"{tok}={nxt}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


# ---------------------------------------------------------------------------------- explain


def _fmt(value: float, digits: int) -> str:
    # "+ 0.0" turns -0.0 into 0.0 so the derivation never shows "-0".
    return format(value + 0.0, f".{digits}g")


def _explain_text(results: Sequence[ToyResult]) -> str:
    r = results[0]
    digits = 8 if r.dtype == "float32" else 12

    def f(v: float) -> str:
        return _fmt(v, digits)

    (xs, ys), (xq, yq) = r.support, r.query
    lines = [
        f"metagrad explain: one MAML step on y = w*x + b, squared-error loss ({r.dtype})",
        "",
        "Setup",
        f"  support (x_s, y_s) = ({f(xs)}, {f(ys)})    query (x_q, y_q) = ({f(xq)}, {f(yq)})",
        f"  inner lr alpha = {f(r.inner_lr)}    meta lr beta = {f(r.meta_lr)}",
        f"  w0 = {f(r.w0)}    b0 = {f(r.b0)}",
        "",
        "Support step: L_s = (w0*x_s + b0 - y_s)^2, r_s = w0*x_s + b0 - y_s",
        f"  dL_s/dw0 = 2*r_s*x_s              = {f(r.support_grad_w)}",
        f"  dL_s/db0 = 2*r_s                  = {f(r.support_grad_b)}",
        "",
        "Fast weights",
        f"  w1 = w0 - alpha*dL_s/dw0          = {f(r.w1)}",
        f"  b1 = b0 - alpha*dL_s/db0          = {f(r.b1)}",
        "",
        "Query step: L_q = (w1*x_q + b1 - y_q)^2, r_q = w1*x_q + b1 - y_q",
        f"  dL_q/dw1 = 2*r_q*x_q              = {f(r.query_grad_w)}",
        f"  dL_q/db1 = 2*r_q                  = {f(r.query_grad_b)}",
    ]
    for res in results:
        lines.append("")
        if res.order == 1:
            lines += [
                "First-order meta-gradient (Hessian term dropped: d(w1,b1)/d(w0,b0) := I)",
                "  g_w = dL_q/dw1 = 2*r_q*x_q",
                "  g_b = dL_q/db1 = 2*r_q",
            ]
        else:
            lines += [
                "Second-order meta-gradient (through the inner gradient, create_graph=True)",
                "  d(w1,b1)/d(w0,b0) = I - alpha*H_s,  H_s = 2*[[x_s^2, x_s], [x_s, 1]]",
                "  g_w = 2*r_q*(x_q - 2*alpha*x_s*(x_s*x_q + 1))",
                "  g_b = 2*r_q*(1 - 2*alpha*(x_s*x_q + 1))",
            ]
        gw_a, gb_a = f(res.meta_grad_w_autograd), f(res.meta_grad_b_autograd)
        width = max(len(gw_a), len(gb_a))
        beta = f(res.meta_lr)
        lines += [
            f"  g_w  autograd = {gw_a:<{width}}    manual = {f(res.meta_grad_w_manual)}",
            f"  g_b  autograd = {gb_a:<{width}}    manual = {f(res.meta_grad_b_manual)}",
            f"  w0' = w0 - beta*g_w = {f(res.w0)} - {beta}*({gw_a}) = {f(res.w0_updated)}",
            f"  b0' = b0 - beta*g_b = {f(res.b0)} - {beta}*({gb_a}) = {f(res.b0_updated)}",
        ]
    return "\n".join(lines)


def _run_explain(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    orders = {"1": (1,), "2": (2,), "both": (1, 2)}[args.order]
    try:
        results = [
            linear_toy(
                args.w0,
                args.b0,
                support=args.support,
                query=args.query,
                inner_lr=args.inner_lr,
                meta_lr=args.meta_lr,
                order=order,
                dtype=_DTYPES[args.dtype],
            )
            for order in orders
        ]
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    if args.json:
        payload: dict[str, Any]
        if len(results) == 1:
            payload = results[0].to_dict()
        else:
            payload = {"first": results[0].to_dict(), "second": results[1].to_dict()}
        print(json.dumps(payload, indent=2))
    else:
        print(_explain_text(results))
    return 0


def _add_explain(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="walk through one MAML step on the linear toy, autograd vs closed form",
        description=(
            "One MAML step on y = w*x + b with squared error and one support / one query "
            "example. Prints the support gradient, the fast weights, the query gradient and "
            "the first- and second-order meta-gradients, each from torch.autograd and from "
            "the closed-form derivation, then the meta-updated w0'. Negative values can be "
            "written '--w0 -0.5' or '--w0=-0.5'."
        ),
    )
    parser.add_argument("--w0", type=_finite_float, default=-0.5258, help="initial weight")
    parser.add_argument("--b0", type=_finite_float, default=0.0, help="initial bias")
    parser.add_argument(
        "--support", type=_xy_pair, default=(1.0, 0.0), metavar="X,Y", help="support example"
    )
    parser.add_argument(
        "--query", type=_xy_pair, default=(2.0, 0.0), metavar="X,Y", help="query example"
    )
    parser.add_argument(
        "--inner-lr", type=_nonneg_float, default=1.0, help="inner learning rate alpha"
    )
    parser.add_argument(
        "--meta-lr", type=_nonneg_float, default=1.0, help="meta learning rate beta"
    )
    parser.add_argument(
        "--order", choices=("1", "2", "both"), default="both", help="meta-gradient order"
    )
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float64")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=functools.partial(_run_explain, parser=parser))


# --------------------------------------------------------------------------------- check


def _run_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from metagrad.check._cli import run_check

    try:
        return run_check(args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    return 2  # pragma: no cover (parser.error exits)


def _add_check(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from metagrad.check._cli import ALGORITHMS

    parser = subparsers.add_parser(
        "check",
        help="verify a meta-gradient against finite differences and an unrolled reference",
        description=(
            "Builds the chosen learner on a model (built-in 'mlp' sinusoid regressor, 'conv4' "
            "Omniglot-shaped classifier, or your own 'package.module:function' factory), draws one "
            "random meta-batch and reports, in float64: agreement with central finite differences, "
            "with an independent unrolled create_graph loop, and how far first order is from "
            "second order. Exit status 0 when both agreements are within tolerance, 1 otherwise."
        ),
    )
    parser.add_argument(
        "--model", default="mlp",
        help="mlp | conv4 | your factory as pkg.mod:build or pkg.mod:build(hidden=32) "
        "(imported from the current folder too)",
    )  # fmt: skip
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="maml")
    parser.add_argument("--inner-steps", type=int_at_least(0), default=1)
    parser.add_argument("--inner-lr", type=_nonneg_float, default=0.01)
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto")
    parser.add_argument("--tasks", type=_positive_int, default=4)
    parser.add_argument(
        "--shots", type=_positive_int, default=5, help="support examples (per class)"
    )
    parser.add_argument(
        "--queries", type=_positive_int, default=5, help="query examples (per class)"
    )
    parser.add_argument("--ways", type=_positive_int, default=5, help="classes for conv4")
    parser.add_argument("--hidden", type=_positive_int, default=16, help="conv4 filters")
    parser.add_argument("--classes", type=_positive_int, default=0, help="custom model: classes")
    parser.add_argument(
        "--input-shape", type=_int_list, default=None, help="custom model: e.g. 3,32,32"
    )
    parser.add_argument("--head", default=None, help="ANIL: adapted parameter prefix")
    parser.add_argument("--directions", type=_positive_int, default=3)
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=functools.partial(_run_check, parser=parser))


# ---------------------------------------------------------------------------------- main

_Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _add_graph(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from metagrad.viz._cli import add_graph_parser

    add_graph_parser(subparsers)


def _add_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from metagrad.training._cli import add_train_parser

    add_train_parser(subparsers)


def _add_eval(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from metagrad.training._cli import add_eval_parser

    add_eval_parser(subparsers)


def _add_compare(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from metagrad.training._cli import add_compare_parser

    add_compare_parser(subparsers)


_REGISTRARS: tuple[_Registrar, ...] = (
    _add_train, _add_eval, _add_compare, _add_explain, _add_check, _add_graph,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Returns the ``metagrad`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="metagrad", description="Exact higher-order meta-gradients for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"metagrad {metagrad.__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show Python tracebacks instead of one-line errors"
    )
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument(
        "--quiet", "-q", action="store_true", help="library messages: errors only (no warnings)"
    )
    loud.add_argument(
        "--verbose", "-v", action="store_true", help="library messages: debug records too"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs the ``metagrad`` command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The process exit status (0 on success). Usage errors exit with status 2 through
        ``argparse`` (``SystemExit``), with a message naming the flag and the expected form.
    """
    args_in = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(_glue_negative_values(args_in))
    if extra:  # as argparse would, but in the subcommand's words: `metagrad train: error: ...`
        sub = _subparser(parser, getattr(args, "command", None))
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Callable[[argparse.Namespace], int] = args.handler
    # The "metagrad" logger's records go to stderr as `metagrad <cmd>: warning: ...` lines, at
    # the level --quiet/--verbose choose; args.debug reaches the subcommands in `args`.
    from metagrad.training._cli import cli_logging, log_level

    with cli_logging(args.command, log_level(args)):
        if args.debug:
            return handler(args)
        return _run_guarded(handler, args)


def _run_guarded(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except (Exception, KeyboardInterrupt) as err:  # one line for users; --debug for the rest
        if isinstance(err, KeyboardInterrupt):
            print(f"metagrad {args.command}: interrupted", file=sys.stderr)
            return 130
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"metagrad {args.command}: error: {type(err).__name__}: {first} "
            f"(run `metagrad --debug {args.command} ...` for the traceback)",
            file=sys.stderr,
        )
        return 1
