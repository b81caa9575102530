"""The marker table of tests/conftest.py stays true as tests move: every marker it applies is declared in
pyproject.toml, and every module, test, fixture and parameter it names still exists."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from conftest import HERE, MARKERS


def _functions(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_marker_the_table_applies_is_declared_in_pyproject_and_no_other():
    config = tomllib.loads((HERE.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = {line.split(":", 1)[0] for line in config["markers"]}
    assert declared == set(MARKERS)


@pytest.mark.parametrize("marker, place", [(m, p) for m, places in MARKERS.items() for p in places])
def test_every_place_the_table_names_exists(marker, place):
    module, _, name = place.partition("::")
    if not module.endswith(".py"):  # a fixture of conftest
        assert module in _functions(HERE / "conftest.py"), f"{marker}: no fixture {module!r} in conftest.py"
        return
    path = HERE / module
    assert path.is_file(), f"{marker}: {module} is gone"
    if name:
        function, _, param = name.partition("[")
        assert function in _functions(path), f"{marker}: no test or fixture {function!r} in {module}"
        assert not param or repr(param.rstrip("]")).replace("'", '"') in path.read_text(), f"{marker}: {place}"
