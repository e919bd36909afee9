"""The train/eval command line as tests call it: one parser, the handler's exit code."""

from __future__ import annotations

import argparse

from metagrad.training._cli import add_eval_parser, add_train_parser


def run_cli(argv: list[str]) -> int:
    """``metagrad train|eval ...`` in this process; returns the exit code."""
    parser = argparse.ArgumentParser(prog="metagrad")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code
