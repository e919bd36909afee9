"""The README's Python examples run as written (a quick-start that fails is the first bug a user sees).

Every ```python block runs in a fresh namespace, except blocks preceded by the line
``<!-- not-run: reason -->`` (signature listings, snippets that need the user's own data).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- not-run:[^>]*-->\n)?```python\n(.*?)```", re.S)


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        if m.group(1) is None:
            out.append((text[: m.start()].count("\n") + 1, m.group(2)))
    return out


def test_readme_has_runnable_examples() -> None:
    assert len(_blocks()) >= 2


@pytest.mark.parametrize(
    "line, code", _blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_example_runs(line: int, code: str) -> None:
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
