"""The README's reproduction numbers are the ones in ``results/*/results.json``.

Each recorded evaluation row must appear in the README formatted as it is printed there, so a
re-run that changes the files without updating the README (or the reverse) fails here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RUNS = sorted((ROOT / "results").glob("**/results.json"))


def _expected(run: dict) -> list[str]:
    """The strings the README shows for each finite row of one run."""
    test = run["test"]
    out = []
    for row in test["rows"]:
        if test["metric"] == "accuracy":
            out.append(f"{100 * row['accuracy']:.2f}% ± {100 * row['accuracy_ci95']:.2f}%")
        elif math.isfinite(row["loss"]) and row["loss_ci95"] < 1.0 and row["steps"] > 0:
            out.append(f"{row['loss']:.3f} ± {row['loss_ci95']:.3f}")
    return out


def test_results_exist() -> None:
    assert len(RUNS) >= 5, RUNS


@pytest.mark.parametrize("path", RUNS, ids=[p.parent.name for p in RUNS])
def test_readme_quotes_recorded_numbers(path: Path) -> None:
    run = json.loads(path.read_text())
    expected = _expected(run)
    assert expected, f"{path} has no rows the README would quote"
    missing = [e for e in expected if e not in README]
    assert not missing, f"README.md does not quote {missing} from {path.relative_to(ROOT)}"
