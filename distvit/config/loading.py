"""Loading the run configuration: YAML, dotted command-line overrides, key and value validation.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.epochs=2"])

Types, bounds and choices are declared on the dataclass fields and checked by pydantic; unknown keys
are rejected with the nearest valid key as a suggestion; cross-field rules (`img_size` divisible by
`patch_size`, a dataset folder with a manifest) are checked in `distvit.config.checks`. Every failure is a
`ConfigError` naming the key, what was given and what is allowed, raised before any process group
exists, so all ranks stop with the same message and none waits in a collective.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from distvit.config.checks import check_semantics
from distvit.config.schema import Config, pydantic
from distvit.errors import ConfigError

_VALIDATOR = pydantic.TypeAdapter(Config) if pydantic is not None else None


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 scalars. YAML 1.1 (PyYAML's default) reads `no`/`off`/`yes`/`on` as booleans (turning
    `mixed_precision: no` into False), `010` as octal, `1:30` as 90, `2024-01-01` as a date, and `3e-4`
    as a string."""


_REPLACED_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("bool", "float", "int", "timestamp")}
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_YamlLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: a repeated key is an error (YAML's default keeps the last one
    silently, so `epochs: 2` above a forgotten `epochs: 20` would train for 20)."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults`: keys written beside it override the merged ones, as YAML intends
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # an unhashable key: construct_mapping reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_YamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    lambda loader, node: _construct_unique_mapping(loader, node, deep=True),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _section_types() -> dict[str, type]:
    """{'run': RunConfig, 'model': ModelConfig, ...}."""
    return {f.name: type(f.default_factory()) for f in dataclasses.fields(Config)}


def all_keys(section_type: type | None = None) -> list[str]:
    """Every dotted key of the configuration (`optim.lr`, ...), or the leaf names of one section type."""
    if section_type is not None:
        return [f.name for f in dataclasses.fields(section_type)]
    return [f"{name}.{key}" for name, cls in _section_types().items() for key in all_keys(cls)]


def _suggest(key: str) -> str:
    """' (did you mean optim.lr?)' for a key close to a valid one, else ''."""
    valid = all_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
    candidates = same_leaf or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not candidates:
        section = key.split(".", 1)[0]
        in_section = [k for k in valid if k.startswith(section + ".")]
        candidates = difflib.get_close_matches(key, in_section, n=1, cutoff=0.5)
    return f" (did you mean {candidates[0]}?)" if candidates else ""


MOVED_KEYS = {
    "data.augment": "augment.preset",
    "data.crop_padding": "augment.crop_padding",
    "data.mixup_alpha": "mix.mixup_alpha",
    "data.cutmix_alpha": "mix.cutmix_alpha",
    "data.mix_prob": "mix.prob",
    "data.mix_switch_prob": "mix.switch_prob",
    "train.eval_every": "eval.every",
    "train.eval_batch_size": "eval.batch_size",
}
"""Keys that moved to the section of the component that reads them: refused with their new place (no
silent aliases, so a config names each setting once, where its reader looks)."""


def _check_known_keys(raw: dict[str, Any], source: str) -> None:
    sections = _section_types()
    for section, body in raw.items():
        if not isinstance(section, str):
            raise ConfigError(
                f"{source}: config section names must be text, got {section!r}. Valid sections: {', '.join(sections)}."
            )
        if section not in sections:
            close = difflib.get_close_matches(section, list(sections), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown config section '{section}'{hint}. Valid sections: {', '.join(sections)}."
            )
        if body is None:
            raw[section] = {}
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"{source}: '{section}' must be a mapping of keys (e.g. {section}.{all_keys(sections[section])[0]}), "
                f"got {body!r}."
            )
        valid = [f.name for f in dataclasses.fields(sections[section])]
        for key in body:
            moved = MOVED_KEYS.get(f"{section}.{key}")
            if moved:
                raise ConfigError(f"{source}: `{section}.{key}` moved to `{moved}`; write it there (same value).")
            if not isinstance(key, str) or key not in valid:
                raise ConfigError(
                    f"{source}: unknown config key '{section}.{key}'{_suggest(f'{section}.{key}')}. "
                    f"Valid keys in '{section}': {', '.join(valid)}."
                )


BOUND_REASONS = {
    "data.num_workers": "each worker is a process with its own interpreter, shard handles and 4 batches read "
    "ahead, and more than the cores only contend (empty: sized to the node's cores)"
}
"""Why a key's upper bound is where it is, added to pydantic's 'less than or equal' message."""


def _format_validation_error(err: "pydantic.ValidationError", source: str) -> str:
    lines = []
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        # Union/Optional members add type names to the location (e.g. 'literal['no','bf16']'); the user
        # thinks in config keys, so keep only the leading identifiers.
        key_parts = []
        for part in loc:
            if not part.isidentifier() and not part.isdigit():
                break
            key_parts.append(part)
        key = ".".join(p for p in key_parts if not p.isdigit()) or "(top level)"
        given = problem.get("input")
        reason = BOUND_REASONS.get(key) if problem.get("type") == "less_than_equal" else None
        lines.append(f"{key}: {problem['msg']} (got {given!r}){': ' + reason if reason else ''}")
    unique = list(dict.fromkeys(lines))
    return f"{source}: invalid config value{'s' if len(unique) > 1 else ''}:\n  " + "\n  ".join(unique)


def _text_key_kind(section: str, key: str) -> str:
    """'text' or 'optional text' when `section.key` is declared as str or Optional[str], else ''."""
    section_type = _section_types().get(section)
    hint = typing.get_type_hints(section_type).get(key) if section_type else None
    return {str: "text", Optional[str]: "optional text"}.get(hint, "")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "train.epochs=2"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"command-line override '{item}' is not of the form key=value (e.g. optim.lr=3e-4). "
                f"Valid keys: {', '.join(all_keys())}."
            )
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-")
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"command-line override '{item}': '{key}' is not a section.key name{_suggest(key)}. "
                f"Valid keys: {', '.join(all_keys())}."
            )
        text_kind = _text_key_kind(parts[0], parts[1])
        if text_kind:
            # Names and paths stay as typed (run.dir=2024-01-01, tracking.project=123); empty clears.
            value = None if text_kind == "optional text" and not text.strip() else text
        else:
            try:
                value = parse_yaml(text) if text.strip() else None
            except yaml.YAMLError:
                value = text  # a string the YAML parser dislikes, e.g. 'a: b'; pydantic decides if it fits
        nested.setdefault(parts[0], {})
        if not isinstance(nested[parts[0]], dict):
            nested[parts[0]] = {}
        nested[parts[0]][parts[1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, body in update.items():
        if isinstance(body, dict) and isinstance(merged.get(section), dict):
            merged[section].update(body)
        else:
            merged[section] = body
    return merged


def read_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            available = sorted(p.name for p in path.parent.glob("*.yaml"))
            if available:
                hint = f" Files in {path.parent}/: {', '.join(available)}."
        raise ConfigError(f"config file {path} does not exist.{hint}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a UTF-8 text file; pass a YAML config (see configs/).") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections ({', '.join(_section_types())}), "
            f"got {type(raw).__name__}."
        )
    return raw


def _unvalidated(raw: dict[str, Any]) -> Config:
    """The config without pydantic: keys are checked, value types and bounds are not."""
    warnings.warn("pydantic is not installed: config values are not type-checked (pip install pydantic).")
    return Config(**{name: cls(**(raw.get(name) or {})) for name, cls in _section_types().items()})


def build_config(
    raw: dict[str, Any], source: str = "config", default_run_name: str = "run", check_data: bool = True
) -> Config:
    """Validate a nested dict (from YAML plus overrides) into a `Config`; raises `ConfigError`.
    `check_data=False` skips the data.path checks (benchmarks on in-memory synthetic data)."""
    _check_known_keys(raw, source)
    if _VALIDATOR is None:
        cfg = _unvalidated(raw)
    else:
        try:
            cfg = _VALIDATOR.validate_python(raw)
        except pydantic.ValidationError as err:
            raise ConfigError(_format_validation_error(err, source)) from None
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / default_run_name)
    cfg.run.dir = os.path.expanduser(cfg.run.dir)
    cfg.data.path = os.path.expanduser(cfg.data.path)
    if isinstance(cfg.model.pretrained, str):
        cfg.model.pretrained = os.path.expanduser(cfg.model.pretrained)
    if cfg.train.resume not in ("", "auto"):
        cfg.train.resume = os.path.expanduser(cfg.train.resume)
    if not cfg.tracking.run_name:
        cfg.tracking.run_name = Path(cfg.run.dir).name
    check_semantics(cfg, source, check_data)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, check_data: bool = True) -> Config:
    """Read a YAML config (or only defaults when `path` is None), apply dotted overrides, validate."""
    raw = read_yaml_config(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    if path is not None:
        _check_known_keys(raw, source)  # errors in the file name the file, not the overrides
    if overrides:
        override_dict = parse_overrides(overrides)
        _check_known_keys(override_dict, "command line")
        raw = _merge(raw, override_dict)
        source = f"{source} + command-line overrides"
    stem = Path(path).stem if path is not None else "run"
    return build_config(raw, source, default_run_name=stem, check_data=check_data)
