"""argparse value types shared by every ``metagrad`` subcommand (CLI layer only).

Each raises ``argparse.ArgumentTypeError`` with the expected form, so argparse prints
``argument --flag: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import math


def number(text: str) -> float:
    """Any float, ``nan`` and ``inf`` included (for settings whose range is validated later,
    with a message naming the setting)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def finite_float(text: str) -> float:
    """A finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """A finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def int_at_least(minimum: int):  # type: ignore[no-untyped-def]
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            bound = "> 0" if minimum == 1 else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value

    return parse


def xy_pair(text: str) -> tuple[float, float]:
    """One example written ``X,Y``."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(
            f"expected one example as X,Y (two numbers separated by a comma, e.g. 1,0), got {text!r}"
        )
    try:
        x, y = (finite_float(p.strip()) for p in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected one example as X,Y with finite numbers X and Y (e.g. 1,0), got {text!r}"
        ) from None
    return x, y


def shape(text: str) -> tuple[int, ...]:
    """A per-example input shape: positive integers such as ``1`` or ``3,32,32``."""
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"expected the per-example input shape as positive integers, e.g. 1 or 3,32,32; got {text!r}"
        )
    return dims


def step_list(text: str) -> list[int]:
    """Inner step counts such as ``0,1,5,10`` (integers >= 0)."""
    try:
        steps = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        steps = [-1]
    if not steps or any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"expected step counts like 0,1,5,10, got {text!r}")
    return steps


def unit_fractions(text: str) -> list[float]:
    """Three numbers ``TRAIN,VAL,TEST`` such as ``0.7,0.1,0.2`` (ranges are checked later)."""
    try:
        parts = [float(t) for t in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"expected three fractions TRAIN,VAL,TEST like 0.7,0.1,0.2, got {text!r}"
        )
    return parts
