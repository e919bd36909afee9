"""Confidence intervals and the README's number format."""

from __future__ import annotations

import json
import math

import pytest

from metagrad.workloads import accuracy_row, machine, mean_ci95, quote, write_results


def test_mean_ci95_uses_student_t() -> None:
    mean, ci = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert ci == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_ci95([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="mean_ci95"):
        mean_ci95([])


def test_rows_quote_as_tests_test_results_recorded_reads_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    row = accuracy_row("x", [0.9, 0.92])
    # the format of tests/test_results_recorded.py for metric "accuracy"
    assert quote(row) == f"{100 * row['accuracy']:.2f}% ± {100 * row['accuracy_ci95']:.2f}%"
    path = write_results(tmp_path / "r" / "results.json", {"machine": machine(), "rows": [row]})
    back = json.loads(path.read_text())
    assert back["rows"][0]["per_seed"] == [0.9, 0.92]
    assert "torch" in back["machine"] and "loadavg_end" in back["machine"]
