"""The package's layers: every import (module level or inside a function) points down or sideways, never up.

errors, fileio  <  data  <  config  <  augment  <  model  <  run  <  engine  <  tools  <  cli, train
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distvit"
LAYERS = ["errors", "fileio", "data", "config", "augment", "model", "run", "engine", "tools", "cli", "train"]
RANK = {name: index for index, name in enumerate(LAYERS)}
RANK.update({"fileio": RANK["errors"], "train": RANK["cli"]})  # same layer


def layer_of(module: str) -> str:
    """'distvit.engine.step' -> 'engine'; 'distvit.errors' -> 'errors'."""
    return module.split(".")[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distvit"):
            names = [node.module] if node.module != "distvit" else [f"distvit.{a.name}" for a in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("distvit.")]
    return found


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue
        assert relative.parts[0].removesuffix(".py") in RANK, f"{relative} is in no layer of {LAYERS}"


def test_imports_never_point_up():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1 and relative.name == "__init__.py":
            continue
        own = relative.parts[0].removesuffix(".py")
        for line, module in imports_of(path):
            if module.count(".") and RANK[layer_of(module)] > RANK[own]:
                upward.append(f"distvit/{relative}:{line} ({own}) imports {module}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The test above would catch a violation: a data module importing the engine is reported."""
    module = tmp_path / "loader.py"
    module.write_text("def f():\n    from distvit.engine.trainer import Trainer\n")
    assert imports_of(module) == [(2, "distvit.engine.trainer")]
    assert RANK[layer_of("distvit.engine.trainer")] > RANK["data"]
