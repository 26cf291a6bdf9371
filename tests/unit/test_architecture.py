"""The package's layers: every import (module level or inside a function) points down or sideways, never up.

errors, fileio  <  data  <  config  <  augment  <  model  <  run  <  engine  <  tools, sweep  <  cli, train
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distvit"
LAYERS = ["errors", "fileio", "data", "config", "augment", "model", "run", "engine", "tools", "sweep", "cli", "train"]
RANK = {name: index for index, name in enumerate(LAYERS)}
# same layer (sweep launches runs as subprocesses and reads run folders: it imports neither tools nor engine)
RANK.update({"fileio": RANK["errors"], "sweep": RANK["tools"], "train": RANK["cli"]})


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


DATA_ROLES = ("prepare", "read")
"""distvit.data's two roles below its contract (manifest, shard format, tar index, images, plan, node)."""


def data_role(module: str) -> str | None:
    """'distvit.data.read.cache' -> 'read'; 'distvit.data.manifest' -> 'contract'; None outside distvit.data."""
    parts = module.split(".")
    if parts[:2] != ["distvit", "data"]:
        return None
    return parts[2] if len(parts) > 2 and parts[2] in DATA_ROLES else "contract"


def crosses_data_roles(importer: str, imported: str) -> bool:
    """The contract imports neither role; prepare and read import the contract and themselves only."""
    own, other = data_role(importer), data_role(imported)
    return own is not None and other is not None and other != "contract" and other != own


def test_prepare_and_read_never_import_each_other_and_the_contract_neither():
    crossing = []
    for path in sorted((PACKAGE / "data").rglob("*.py")):
        importer = "distvit." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        crossing += [
            f"{importer}:{line} imports {module}"
            for line, module in imports_of(path)
            if crosses_data_roles(importer, module)
        ]
    assert not crossing, "imports across distvit.data's roles:\n" + "\n".join(crossing)
    roles = {data_role("distvit." + ".".join(p.relative_to(PACKAGE).parts[:2])) for p in PACKAGE.glob("data/*/*.py")}
    assert roles == set(DATA_ROLES)  # the test walks the real subpackages


def test_the_role_check_sees_a_crossing():
    assert crosses_data_roles("distvit.data.read.cache", "distvit.data.prepare.writer")
    assert crosses_data_roles("distvit.data.prepare.writer", "distvit.data.read.memory")
    assert crosses_data_roles("distvit.data.tarindex", "distvit.data.read.memory")  # the contract imports no role
    assert not crosses_data_roles("distvit.data.read.cache", "distvit.data.manifest")
    assert not crosses_data_roles("distvit.data.prepare.cifar10", "distvit.data.prepare.safe_pickle")
    assert not crosses_data_roles("distvit.engine.sources", "distvit.data.read.loader")  # the layers test's job
