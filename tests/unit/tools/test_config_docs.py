"""docs/configuration.md is what distvit.tools.config_docs renders from the schema, so the two cannot drift."""

from __future__ import annotations

import difflib
import typing
from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from distvit.config import all_keys
from distvit.tools import config_docs


def test_the_configuration_page_is_what_the_schema_renders():
    committed = config_docs.page_path().read_text(encoding="utf-8")
    rendered = config_docs.render_page()
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            rendered.splitlines(keepends=True),
            "docs/configuration.md (committed)",
            "docs/configuration.md (rendered from distvit/config/schema.py)",
            n=1,
        )
    )
    assert committed == rendered, f"regenerate it: {config_docs.COMMAND}\n{diff[:6000]}"


def test_every_key_has_a_row():
    page = config_docs.render_page()
    missing = [key for key in all_keys() if f"| `{key}` |" not in page]
    assert not missing, f"keys without a row: {missing}"


def test_field_docstrings_are_read_from_the_source():
    source = '''
class Section:
    """What the section is for."""

    plain: int = 1
    """A documented field,
    over two lines."""
    bare: str = ""
    other: float = 0.5
    """Another."""
'''
    classes, fields = config_docs.docstrings(source)
    assert classes == {"Section": "What the section is for."}
    assert fields == {("Section", "plain"): "A documented field, over two lines.", ("Section", "other"): "Another."}


def test_types_are_described_with_their_bounds_and_choices():
    describe = config_docs.describe_type
    assert describe(Optional[Annotated[int, Field(ge=0, le=64, strict=True)]]) == "int in [0, 64] or empty"
    assert describe(Annotated[float, Field(gt=0)]) == "float > 0"
    assert describe(Annotated[float, Field(ge=0, lt=1)]) == "float in [0, 1)"
    assert describe(Annotated[int, Field(ge=0, lt=2**32)]) == "int in [0, 2^32)"
    assert describe(Literal["a", "b"]) == "`a`, `b`"
    assert describe(Union[bool, str]) == "bool or str"
    assert describe(tuple[float, float]) == "[float, float]"
    assert describe(list[Annotated[float, Field(gt=0)]]) == "list of float > 0"
    assert describe(Annotated[str, Field(pattern=r"^(a|b)$")]) == "str matching ^(a|b)$"
    # without pydantic the schema's Field stand-in is a tuple of sorted constraints
    assert describe(typing.Annotated[int, (("ge", 1), ("le", 16), ("strict", True))]) == "int in [1, 16]"


def test_defaults_are_written_as_in_yaml():
    describe = config_docs.describe_default
    assert [describe(v) for v in (None, "", False, 0.0005, "auto", (0.9, 0.999), [])] == [
        "empty",
        "empty",
        "`false`",
        "`0.0005`",
        "`auto`",
        "`[0.9, 0.999]`",
        "`[]`",
    ]


def test_cells_render_alike_on_github_and_mkdocs():
    cell = config_docs.table_cell
    assert cell("a | b, `code`") == "a \\| b, `code`"
    assert cell("lr * decay, rank<N>.jsonl") == "lr \\* decay, rank&lt;N>.jsonl"
    assert cell("`x|y` stays readable") == "x\\|y stays readable"
    assert cell("an `unmatched backtick") == "an 'unmatched backtick"
