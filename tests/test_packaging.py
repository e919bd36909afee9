"""The wheel a user installs: only the package, typed, licensed, with complete metadata.

The wheel is built from a fresh copy of the source (``src/``, ``pyproject.toml``, ``README.md``,
``LICENSE``) so stale files of an earlier in-tree build cannot leak into it.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import metagrad

ROOT = Path(__file__).resolve().parents[1]
CONTROL = {chr(c) for c in range(32)} - {"\n", "\t"}


def _build_isolation_needed() -> bool:
    try:
        import setuptools
    except ImportError:
        return True
    return int(setuptools.__version__.split(".")[0]) < 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("source")
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    if not _build_isolation_needed():
        cmd.insert(-4, "--no-build-isolation")  # offline and fast with the setuptools installed
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("metagrad-*.whl")
    return zipfile.ZipFile(built)


def _source_files() -> set[str]:
    pkg = ROOT / "src" / "metagrad"
    return {
        str(p.relative_to(ROOT / "src"))
        for p in pkg.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")
    }


def test_wheel_holds_the_package_and_nothing_else(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    info = f"metagrad-{metagrad.__version__}.dist-info/"
    assert all(n.startswith(("metagrad/", info)) for n in names), names
    assert not [n for n in names if "tests/" in n or "benchmarks/" in n or n.startswith("results/")]
    package = {n for n in names if n.startswith("metagrad/")}
    assert {n for n in package if not n.endswith((".py", "/py.typed"))} == set()  # no data files
    assert "metagrad/py.typed" in package
    assert package == _source_files()  # every module (and only those) ships
    assert f"{info}licenses/LICENSE" in names


def test_wheel_metadata(wheel: zipfile.ZipFile) -> None:
    info = f"metagrad-{metagrad.__version__}.dist-info/"
    meta = Parser().parsestr(wheel.read(f"{info}METADATA").decode())
    assert meta["Name"] == "metagrad" and meta["Version"] == metagrad.__version__
    assert meta["License-Expression"] == "MIT"
    assert meta["Author"] == "metagrad contributors"
    assert meta["Requires-Python"] == ">=3.10"
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and len(classifiers) >= 8
    assert not [c for c in classifiers if c.startswith("License ::")]  # the SPDX field says it
    assert "meta-learning" in meta["Keywords"]
    assert any(r.startswith("torch") for r in meta.get_all("Requires-Dist"))
    entry = wheel.read(f"{info}entry_points.txt").decode()
    assert "metagrad = metagrad.cli:main" in entry
    licence = wheel.read(f"{info}licenses/LICENSE").decode()
    assert licence.startswith("MIT License") and "metagrad contributors" in licence


def test_docstrings_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """No control characters (a missing raw string turns ``\\varphi`` into a vertical tab)."""
    bad = []
    for mod in pkgutil.walk_packages(metagrad.__path__, "metagrad."):
        try:
            module = importlib.import_module(mod.name)
        except ImportError:  # an optional dependency (tensorboard, ...)
            continue
        objects = [module, *vars(module).values()]
        for obj in objects:
            if getattr(obj, "__module__", module.__name__) != module.__name__:
                continue
            docs = [getattr(obj, "__doc__", None)]
            docs += (
                [getattr(m, "__doc__", None) for m in vars(obj).values()]
                if isinstance(obj, type)
                else []
            )
            for doc in docs:
                if isinstance(doc, str) and CONTROL & set(doc):
                    bad.append(f"{mod.name}.{getattr(obj, '__qualname__', '')}")
    assert not bad, sorted(set(bad))
