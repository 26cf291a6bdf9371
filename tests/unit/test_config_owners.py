"""Every config key is read by the component that owns its section, and nowhere else.

A component is built from the sections it owns (keyword arguments) and passes other sections on unread;
what it needs from another section comes from that section's owner (a value it computed, a function of
its module). So the reader of a setting is found in its section's modules, and a section's keys are read
where the manual says. This test finds every read of a section's key in distvit/ (`cfg.data.path`,
`data.path` where `data` holds the data section, `self.cfg.every`, `getattr(section, name)`,
`dataclasses.asdict(section)`) and checks that the module reading it owns the section. Which name holds
which section is known from annotations (`cfg: DataConfig`, `cfg: Config`), from assignments
(`train = cfg.train`, `self.cfg = cfg`) and from names (`data_cfg`).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from distvit.config import Config

PACKAGE = Path(__file__).resolve().parents[1].parent / "distvit"
SECTIONS = {f.name: type(f.default_factory()).__name__ for f in dataclasses.fields(Config)}
SECTION_OF_CLASS = {cls: section for section, cls in SECTIONS.items()}
WHOLE = "Config"

OWNERS = {
    "run": {"run/rundir.py"},
    "model": {"model/build.py"},
    "surgery": {"model/build.py", "model/record.py"},
    # the data sources (with the fetch limits of their remote shards) and the epoch order they plan
    "data": {"engine/sources.py", "engine/order.py"},
    "augment": {"augment/recipe.py"},
    "mix": {"engine/mixing.py"},
    # the optimizer and its schedule; the step clips the gradients before each optimizer step
    "optim": {"engine/optim.py", "engine/step.py"},
    # the training loop, what a step is made of and the processes it runs in
    "train": {"engine/trainer.py", "engine/step.py", "engine/parts.py", "engine/accelerator.py"},
    "eval": {"engine/evaluator.py"},
    "tracking": {"run/tracking.py"},
    # checkpoints (the schema, writing, export) and when they are written
    "checkpoint": {"engine/checkpointer.py", "engine/after_step.py"},
    "ema": {"engine/ema.py"},
    "distill": {"engine/teacher.py"},
}
EXEMPT = {
    "config": "the schema, its loading and the rules across keys: every key",
    "tools": "the commands (each assembles its own run) and the checks across keys that need a dataset",
    "cli.py": "the command line",
    "train.py": "accelerate's entry file",
}
"""Modules that read any section (by top-level package or file name), each with the reason."""


def _annotated_section(annotation: ast.expr | None) -> str | None:
    """'data' for `DataConfig` (also in `DataConfig | None`, `Optional[...]`, a string), WHOLE for `Config`."""
    if annotation is None:
        return None
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return _annotated_section(ast.parse(annotation.value, mode="eval").body)
    names = {node.id for node in ast.walk(annotation) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(annotation) if isinstance(node, ast.Attribute)}
    sections = [SECTION_OF_CLASS[name] for name in names if name in SECTION_OF_CLASS]
    if len(sections) == 1:
        return sections[0]
    return WHOLE if WHOLE in names else None


def _key(target: ast.expr) -> str | None:
    """The binding name of an assignment target: 'cfg', or 'self.cfg'."""
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
        return f"self.{target.attr}"
    return None


def _resolve(expr: ast.expr, env: dict[str, str]) -> str | None:
    """What `expr` holds: a section's name, WHOLE, or None (not a config)."""
    key = _key(expr)
    if key is not None:
        if key in env:
            return env[key]
        stem = key.rsplit(".", 1)[-1]
        if stem.endswith("_cfg") and stem.removesuffix("_cfg") in SECTIONS:  # data_cfg, train_cfg
            return stem.removesuffix("_cfg")
        return None
    if isinstance(expr, ast.Attribute) and expr.attr in SECTIONS and _resolve(expr.value, env) == WHOLE:
        return expr.attr
    return None


def _bind(scope: ast.AST, env: dict[str, str], attributes: dict[str, str]) -> None:
    """Add the scope's parameters and assignments that hold a config or a section to `env` (and those
    to self.<name> to `attributes`, shared by the methods of a class). Two passes: a binding may use one
    made later in the source (`self.cfg = cfg` read in a method above __init__)."""
    for _ in range(2):
        for node in ast.walk(scope):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                arguments = node.args
                for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
                    section = _annotated_section(arg.annotation)
                    if section:
                        env[arg.arg] = section
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                pairs = []
                for target in targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs += list(zip(target.elts, node.value.elts))
                    elif node.value is not None:
                        pairs.append((target, node.value))
                for target, value in pairs:
                    key, section = _key(target), _resolve(value, env)
                    if key and section:
                        env[key] = section
                        if key.startswith("self."):
                            attributes[key] = section


def _reads_in(scope: ast.AST, env: dict[str, str]) -> list[tuple[int, str, str]]:
    reads = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            section = _resolve(node.value, env)
            if section and section != WHOLE:
                reads.append((node.lineno, section, node.attr))
        elif isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            section = _resolve(node.args[0], env)
            if name in ("getattr", "asdict", "replace", "vars") and section and section != WHOLE:
                reads.append((node.lineno, section, "*"))
    return reads


def config_reads(source: str) -> list[tuple[int, str, str]]:
    """(line, section, key) of every read of a section's key in a module's source ('*': all of them)."""
    tree = ast.parse(source)
    module_env: dict[str, str] = {}
    top_level = ast.Module(body=[node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))])
    _bind(top_level, module_env, {})
    reads = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            methods = [item for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
            attributes: dict[str, str] = {}
            for _ in range(2):  # a method may use an attribute set in a method below it
                for method in methods:
                    _bind(method, {**module_env, **attributes}, attributes)
            for item in node.body:
                env = {**module_env, **attributes}
                if item in methods:
                    _bind(item, env, {})
                reads += _reads_in(item, env)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            env = dict(module_env)
            _bind(node, env, {})
            reads += _reads_in(node, env)
        else:
            reads += _reads_in(node, module_env)
    return sorted(set(reads))


def owner_of(relative: str) -> str | None:
    """The EXEMPT entry covering a module ('engine/step.py'), if any."""
    top = relative.split("/", 1)[0]
    return top if top in EXEMPT else None


def violations(relative: str, source: str) -> list[str]:
    """The reads in module `relative` (a path under distvit/) of keys of sections it does not own."""
    if owner_of(relative):
        return []
    return [
        f"distvit/{relative}:{line} reads {section}.{key}, a key of the {section} section, owned by "
        f"{', '.join(sorted(OWNERS[section]))}"
        for line, section, key in config_reads(source)
        if relative not in OWNERS[section]
    ]


def test_every_section_has_owners_that_exist():
    assert set(OWNERS) == set(SECTIONS)
    for section, modules in OWNERS.items():
        for module in modules:
            assert (PACKAGE / module).is_file(), f"{section}: {module} does not exist"


def test_no_config_key_is_read_outside_the_component_that_owns_its_section():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        found += violations(relative, path.read_text())
    assert not found, "config keys read outside their section's owners:\n" + "\n".join(found)


def test_every_parameter_named_for_a_config_is_seen_by_the_check():
    """A `cfg` parameter the check cannot place (no config annotation, no `<section>_cfg` name) would hide
    its reads: outside the exempt modules, there is none."""
    unplaced = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if owner_of(relative):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                    named = arg.arg == "cfg" or arg.arg.endswith("_cfg")
                    if named and not (_annotated_section(arg.annotation) or _resolve(ast.Name(arg.arg), {})):
                        unplaced.append(f"distvit/{relative}:{node.lineno} {node.name}({arg.arg})")
    assert not unplaced, "annotate these with their config section:\n" + "\n".join(unplaced)


def test_each_owner_reads_its_section():
    """The map is not stale: every owning module reads a key of the sections it is said to own."""
    unread = []
    for section, modules in OWNERS.items():
        for module in modules:
            if not any(s == section for _, s, _ in config_reads((PACKAGE / module).read_text())):
                unread.append(f"{module} reads no key of {section}")
    assert not unread, "\n".join(unread)


def test_the_check_sees_a_key_read_by_another_component(tmp_path):
    """The test above would catch a violation: an evaluator reading the data section's key, through the
    whole config, through a section held in a variable or an attribute, or all of a section at once."""
    module = tmp_path / "evaluator.py"
    module.write_text(
        "from distvit.config import Config, DataConfig, EvalConfig\n"
        "def split_of(cfg: Config):\n"
        "    return cfg.data.eval_split\n"
        "def path_of(data: DataConfig):\n"
        "    return data.path\n"
        "class Evaluator:\n"
        "    def __init__(self, cfg: EvalConfig, whole: Config):\n"
        "        self.cfg, self.data = cfg, whole.data\n"
        "    def due(self):\n"
        "        return self.cfg.every, self.data.trace_samples, getattr(self.data, 'mode')\n"
        "def shuffle_of(data_cfg):\n"
        "    return data_cfg.shuffle\n"
        "def passes_on(cfg: Config):\n"
        "    return build(cfg.data), cfg.to_dict()\n"
    )
    reads = config_reads(module.read_text())
    assert reads == [
        (3, "data", "eval_split"),
        (5, "data", "path"),
        (10, "data", "*"),
        (10, "data", "trace_samples"),
        (10, "eval", "every"),
        (12, "data", "shuffle"),
    ]
    found = violations("engine/evaluator.py", module.read_text())
    assert len(found) == 5 and all("the data section, owned by engine/order.py" in line for line in found)
    assert found[0].startswith("distvit/engine/evaluator.py:3 reads data.eval_split")
    assert violations("tools/evaluate.py", module.read_text()) == []  # a command may read any key
