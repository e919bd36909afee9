"""The end of every example script: write ``results.json`` and print the test rows as a table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from metagrad.workloads import write_results


def write_and_print(
    output: str,
    payload: dict[str, Any],
    columns: Sequence[str],
    cells: Callable[[dict[str, Any]], Sequence[str]],
) -> None:
    """Write ``payload`` to ``<output>/results.json``; print ``payload["test"]["rows"]`` in Markdown.

    ``columns`` are the table's headers, ``cells(row)`` one row's cells (as text).
    """
    path = write_results(f"{output}/results.json", payload)
    print(f"\nwrote {path}\n")
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for r in payload["test"]["rows"]:
        print("| " + " | ".join(cells(r)) + " |")
