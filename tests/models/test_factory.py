"""``load_factory``: ``--model package.module:function(args)`` from the current folder."""

from __future__ import annotations

import doctest
import os
import sys
from pathlib import Path

import pytest

import metagrad.models._factory as factory_impl
from metagrad.cli import main
from metagrad.models import load_factory

PKG = "mg_factory_pkg"


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding ``mg_factory_pkg/models.py``, as cwd, with no cwd entry on sys.path."""
    pkg = tmp_path / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import torch\n\n"
        "def build(hidden=16, depth=1):\n"
        "    layers = [torch.nn.Linear(1, hidden), torch.nn.Tanh()] * depth\n"
        "    return torch.nn.Sequential(*layers[:2], torch.nn.Linear(hidden, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    # As under the `metagrad` console script: neither '' nor the cwd is on sys.path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    for name in [m for m in sys.modules if m.startswith(PKG)]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_imports_from_the_current_folder(user_folder: Path) -> None:
    net = load_factory(f"{PKG}.models:build")()
    assert net[0].out_features == 16
    assert str(user_folder) in sys.path


def test_arguments_in_the_spec(user_folder: Path) -> None:
    net = load_factory(f"{PKG}.models:build(32)")()
    assert net[0].out_features == 32
    net = load_factory(f" {PKG}.models:build(hidden=8, depth=2) ")()
    assert net[0].out_features == 8


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            f"{PKG}.models:build(hiden=8)",
            r"unexpected keyword argument 'hiden'.*\(hidden=16, depth=1\)",
        ),
        (f"{PKG}.models:build(hidden=size)", "literal values"),
        (f"{PKG}.models:build(hidden=8", "literal values"),
        (f"{PKG}.models:build(**opts)", "literal values"),
        (f"{PKG}.models:build(1, 2, 3)", "too many positional arguments"),
        ("no_such_pkg_xyz.models:build", "searched the current folder"),
    ],
)
def test_bad_specs_name_the_fix(user_folder: Path, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_factory(spec)


def test_metagrad_check_with_a_local_factory_and_arguments(
    user_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", "--model", f"{PKG}.models:build(hidden=4)", "--input-shape", "1",
                 "--tasks", "2", "--shots", "2", "--queries", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict: PASS" in out


def test_docstring_examples_run() -> None:
    result = doctest.testmod(factory_impl)
    assert result.failed == 0 and result.attempted > 0
