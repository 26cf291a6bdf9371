"""The configuration reference (docs/configuration.md), rendered from the schema so the two cannot drift.

    python -m distvit.tools.config_docs > docs/configuration.md

For every section of `distvit.config.schema.Config`, in the schema's order, one Markdown table with each
key's type (with its bounds and choices), default and meaning. The meaning is the field's docstring: the
string literal right below the field in `schema.py`, read with `ast` because dataclass fields do not keep
it at runtime; a section's class docstring becomes the text above its table. The page's hand-written
introduction is `INTRO` below, so the whole page is reproducible; `tests/unit/tools/test_config_docs.py`
fails when the committed page differs from what this renders.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from distvit.config import schema

COMMAND = "python -m distvit.tools.config_docs > docs/configuration.md"

INTRO = f"""\
# Configuration

<!-- Generated from distvit/config/schema.py by
     {COMMAND}
     Edit the schema's docstrings (or INTRO in distvit/tools/config_docs.py), not this file:
     tests/unit/tools/test_config_docs.py fails when the two differ. -->

A run is described by a YAML file (the ones in `configs/` are a start) with the sections below. Every key
is optional except `data.path`; what a file leaves out takes the default listed here.

```yaml
model:
  name: deit_tiny_patch16_224
  pretrained: true
surgery:
  img_size: 224
data:
  path: data/cifar10
optim:
  lr: 5.0e-4
train:
  epochs: 2
  batch_size: 256
```

**Overrides.** Any key can be set on the command line after the config as `section.key=value`, for every
command that takes `--config` (`distvit train`, `accelerate launch ... distvit/train.py`, `distvit config`,
`distvit surgery`, `distvit bench train`): `optim.lr=3e-4 model.pretrained=true optim.betas=[0.9,0.99]`.
Values are parsed as YAML; an empty value (`train.resume=`) means empty.

**YAML 1.2.** Files and overrides are read as YAML 1.2, not PyYAML's default 1.1: `no`, `off`, `yes` and
`on` stay text (so `mixed_precision: no` means fp32, not false), `3e-4` is a number, `010` is ten, and a
key written twice in one file is an error naming both lines.

**Validation.** The whole config is checked before any process starts or waits for another, and a problem
is one `distvit: error:` line naming the key, the value given and what is allowed (exit status 2):
unknown keys (with the nearest valid key for a typo: `unknown config key 'optim.lrr' (did you mean
optim.lr?)`), keys that moved to another section (named with their new place: `data.augment` is now
`augment.preset`), wrong types (an integer key takes an integer only: `train.epochs=1e23`, `2.0` or `true` are
errors), values out of bounds or not among the choices, and rules that span keys or files (the input size
divisible by the patch size, a dataset folder with a manifest, a global batch no larger than the training
images). What can only be known once the ranks exist (a global batch not divisible by their number) stops
every rank at the same point with the same message. `distvit config --config FILE [key=value ...]` runs
every check and prints the resolved config without starting anything; `--get SECTION.KEY` prints one
value.

In the tables, *empty* means the key is left out (or `null`, or an empty value): the meaning says what
distvit then chooses. Types: `int` keys take integers only; bounds are written as intervals, `[0, 1)` is
0 <= x < 1. *The lesson* is the course notebook distvit grew from
([Getting started](getting-started.md#where-distvit-comes-from))."""

# Where each section's behaviour is explained (a section not listed gets no link).
SECTION_PAGES = {
    "run": ("runs.md", "What a run writes"),
    "model": ("training.md#model-surgery", "Model surgery"),
    "surgery": ("training.md#model-surgery", "Model surgery"),
    "data": ("datasets.md", "Datasets"),
    "augment": ("augmentation.md", "Augmentation"),
    "mix": ("augmentation.md#mixup-and-cutmix", "Mixup and CutMix"),
    "optim": ("training.md#optimizers-and-schedules", "Optimizers and schedules"),
    "train": ("training.md", "Training"),
    "eval": ("training.md#evaluation", "Evaluation"),
    "tracking": ("runs.md#tracking-with-weights-and-biases", "Tracking with Weights and Biases"),
    "checkpoint": ("distributed.md#stops-and-resume", "Stops and resume"),
    "ema": ("training.md#ema-and-distillation", "EMA and distillation"),
    "distill": ("training.md#ema-and-distillation", "EMA and distillation"),
}


def docstrings(source: str) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """({class: its docstring}, {(class, field): the string literal right below the field}) of a module's
    source; whitespace is normalised to single spaces."""
    classes: dict[str, str] = {}
    fields: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        doc = ast.get_docstring(node)
        if doc:
            classes[node.name] = " ".join(doc.split())
        for statement, following in zip(node.body, node.body[1:]):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                fields[(node.name, statement.target.id)] = " ".join(following.value.value.split())
    return classes, fields


def _constraints(metadata: Any) -> dict[str, Any]:
    """Bounds and pattern of an `Annotated` type's metadata: a pydantic FieldInfo (its `metadata` holds
    annotated_types' Gt/Ge/Lt/Le and the pattern) or the schema's stand-in tuple without pydantic."""
    if isinstance(metadata, tuple):
        return {k: v for k, v in metadata if k in ("gt", "ge", "lt", "le", "pattern")}
    found: dict[str, Any] = {}
    for item in [metadata, *getattr(metadata, "metadata", [])]:
        for name in ("gt", "ge", "lt", "le", "pattern"):
            value = getattr(item, name, None)
            if value is not None:
                found[name] = value
    return found


def _number(value: Any) -> str:
    if isinstance(value, int) and value >= 2**20 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    return repr(value)


def _bounds(constraints: dict[str, Any]) -> str:
    lower = (
        ("[", constraints["ge"]) if "ge" in constraints else ("(", constraints["gt"]) if "gt" in constraints else None
    )
    upper = (
        ("]", constraints["le"]) if "le" in constraints else (")", constraints["lt"]) if "lt" in constraints else None
    )
    if lower and upper:
        return f" in {lower[0]}{_number(lower[1])}, {_number(upper[1])}{upper[0]}"
    if lower:
        return f" {'>=' if lower[0] == '[' else '>'} {_number(lower[1])}"
    if upper:
        return f" {'<=' if upper[0] == ']' else '<'} {_number(upper[1])}"
    return ""


def describe_type(hint: Any) -> str:
    """A type hint of the schema in words: `int >= 0`, `float in (0, 1]`, `` `a`, `b` ``, `str or empty`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        base, *metadata = args
        constraints: dict[str, Any] = {}
        for item in metadata:
            constraints.update(_constraints(item))
        text = describe_type(base) + _bounds(constraints)
        if "pattern" in constraints:
            text += f" matching {constraints['pattern']}"
        return text
    if origin is typing.Literal:
        return ", ".join(f"`{choice}`" for choice in args)
    if origin is typing.Union:
        present = [arg for arg in args if arg is not type(None)]
        text = " or ".join(describe_type(arg) for arg in present)
        return text + (" or empty" if len(present) < len(args) else "")
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(describe_type(arg) for arg in args) + "]"
        return f"list of {describe_type(args[0])}" if args else "list"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def describe_default(value: Any) -> str:
    if value is None or value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(describe_default(v).strip("`") for v in value) + "]`"
    return f"`{value}`"


def table_cell(text: str) -> str:
    """Markdown for one table cell that GitHub and MkDocs render alike: outside code spans `|`, `*` and `<` are
    escaped; a code span holding `|` (which the two tables split differently) becomes plain text."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unmatched backtick: no code spans at all
        parts = [text.replace("`", "'")]
    out = []
    for index, part in enumerate(parts):
        code = index % 2 == 1
        if code and "|" not in part:
            out.append(f"`{part}`")
            continue
        for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("<", "&lt;")):
            part = part.replace(char, escaped)
        out.append(part)
    return "".join(out)


def _default_of(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def render_section(name: str, section_type: type, class_docs: dict[str, str], field_docs: dict) -> str:
    hints = typing.get_type_hints(section_type, include_extras=True)
    lines = [f"## {name}", ""]
    intro = class_docs.get(section_type.__name__, "")
    page = SECTION_PAGES.get(name)
    if page:
        intro = (intro + " " if intro else "") + f"See [{page[1]}]({page[0]})."
    if intro:
        lines += [intro, ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for item in dataclasses.fields(section_type):
        meaning = field_docs.get((section_type.__name__, item.name), "")
        cells = [
            f"`{name}.{item.name}`",
            table_cell(describe_type(hints[item.name])),
            table_cell(describe_default(_default_of(item))),
            table_cell(meaning),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_page() -> str:
    """The whole page: INTRO, then one table per section of Config, in the schema's order."""
    class_docs, field_docs = docstrings(inspect.getsource(schema))
    sections = typing.get_type_hints(schema.Config)
    blocks = [INTRO]
    for item in dataclasses.fields(schema.Config):
        blocks.append(render_section(item.name, sections[item.name], class_docs, field_docs))
    return "\n\n".join(blocks) + "\n"


def page_path() -> Path:
    """Where the committed page lives (the repository's docs/ folder)."""
    return Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(f"usage: {COMMAND}", file=sys.stderr)
        return 2
    sys.stdout.write(render_page())
    return 0


if __name__ == "__main__":
    sys.exit(main())
