"""The sweep file (configs/sweeps/*.yaml): parsed and checked into a `SweepSpec`.

    name: demo                        # default: the file's stem (the W&B group, the folder's default name)
    config: ../demo.yaml              # the base config, relative to this file
    dir: runs/sweeps/demo             # the sweep folder (default: runs/sweeps/NAME)
    overrides: {train.epochs: 3}      # fixed changes to the base config, as config keys
    space:                            # the search space: config keys, or named variants
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      optim.weight_decay: {uniform: [0.0, 0.1]}
      train.epochs: {int: [2, 6]}                      # optional `step: N`
      augment.preset: {choice: [none, crop_flip]}      # or `grid: [...]` (then every parameter is a grid)
      recipe:                                          # a name without a dot: variants of several keys
        choice: {small: {surgery.img_size: 32}, large: {surgery.img_size: 64, train.batch_size: 32}}
    objective: {metric: accuracy, split: test, direction: maximize}
    trials: 20                        # a grid: at most its size (default: all of it)
    pruner: {type: asha, min_epochs: 1, reduction_factor: 3}   # or `pruner: none`
    sampler: {seed: 0}
    heartbeat_timeout_s: 300          # a trial whose worker was silent this long goes to another worker

Every mistake is one `ConfigError` naming the file and line: an unknown key, a space key that is not a
config key (or one the sweep sets itself: run.*, train.resume), an empty range, a wrong type. Types and
bounds come from the config schema itself: the base config is resolved with each range's ends and each
choice applied (`check_samples`), so a value the schema refuses is refused here, before any trial runs.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distvit.config import MOVED_KEYS, all_keys, build_config, parse_overrides, parse_yaml, read_yaml_config
from distvit.errors import ConfigError

RANGES = ("loguniform", "uniform", "int")
CHOICES = ("choice", "grid")
METRICS = ("accuracy", "top5", "loss", "ema_accuracy", "ema_top5", "ema_loss")
"""Objective metrics: fields of the evaluation records in a run's metrics.jsonl."""
TOP_KEYS = (
    "name",
    "config",
    "dir",
    "overrides",
    "space",
    "objective",
    "trials",
    "pruner",
    "sampler",
    "heartbeat_timeout_s",
)
SET_BY_THE_SWEEP = ("run.", "train.resume")
"""Keys each trial gets from the sweep (its own folder, its resume): not in a space or the overrides."""
DIRECTIONS = {"maximize": "maximize", "maximise": "maximize", "minimize": "minimize", "minimise": "minimize"}
PRUNERS = ("asha", "none")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space. `name`: a config key (optim.lr) or, for `variants`, a name."""

    name: str
    kind: str
    """One of RANGES or CHOICES."""
    low: float | None = None
    high: float | None = None
    step: float | None = None
    values: tuple = ()
    """choice/grid: the values (for variants, their names)."""
    variants: dict[str, dict[str, Any]] | None = None
    """Named variants: {variant: {config key: value}}."""

    def settings(self, value: Any) -> dict[str, Any]:
        """The config keys a suggested `value` sets."""
        if self.variants is not None:
            return dict(self.variants[value])
        return {self.name: value}

    def samples(self) -> list[Any]:
        """Values that stand for the whole dimension when checking it against the schema."""
        return list(self.values) if self.kind in CHOICES else [self.low, self.high]

    def keys(self) -> set[str]:
        if self.variants is None:
            return {self.name}
        return {key for variant in self.variants.values() for key in variant}

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind in RANGES:
            plain.update(low=self.low, high=self.high, step=self.step)
        else:
            plain["values"] = list(self.values)
        if self.variants is not None:
            plain["variants"] = self.variants
        return plain

    @classmethod
    def from_dict(cls, plain: dict[str, Any]) -> Param:
        fields = dict(plain)
        fields["values"] = tuple(fields.get("values", ()))
        return cls(**fields)


@dataclass(frozen=True)
class Objective:
    metric: str = "accuracy"
    split: str = "test"
    direction: str = "maximize"


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "asha"
    min_epochs: int = 1
    reduction_factor: int = 3


@dataclass(frozen=True)
class SweepSpec:
    name: str
    dir: Path
    base: dict[str, Any]
    """The resolved base config (Config.to_dict()), overrides applied; each trial adds its parameters."""
    space: tuple[Param, ...]
    objective: Objective
    trials: int
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    seed: int = 0
    heartbeat_timeout_s: float = 300.0
    source: str = ""

    @property
    def grid(self) -> bool:
        return bool(self.space) and all(param.kind == "grid" for param in self.space)

    def search(self) -> dict[str, Any]:
        """What makes two sweeps the same study: the space, the objective, the pruner, the seed and the
        base config (less what differs per trial). Not the number of trials, nor the heartbeat."""
        base = copy.deepcopy(self.base)
        base.pop("run", None)
        base.get("tracking", {}).pop("run_name", None)
        return {
            "space": [param.to_dict() for param in self.space],
            "objective": vars(self.objective),
            "pruner": vars(self.pruner),
            "seed": self.seed,
            "base": base,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "trials": self.trials,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            **self.search(),
            "base": self.base,
        }

    @classmethod
    def from_json(cls, plain: dict[str, Any], directory: Path) -> SweepSpec:
        return cls(
            name=plain["name"],
            dir=directory,
            base=plain["base"],
            space=tuple(Param.from_dict(p) for p in plain["space"]),
            objective=Objective(**plain["objective"]),
            trials=plain["trials"],
            pruner=PrunerSpec(**plain["pruner"]),
            seed=plain["seed"],
            heartbeat_timeout_s=plain["heartbeat_timeout_s"],
            source=plain.get("source", ""),
        )

    def trial_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """The base config with a trial's parameter `values` ({param name: value}) applied (unresolved)."""
        raw = copy.deepcopy(self.base)
        for param in self.space:
            if param.name in values:
                _assign(raw, param.settings(values[param.name]))
        return raw


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for each leaf that differs between two nested dicts."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        where = f"{prefix}{key}"
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            a, b = dict(enumerate(a)), dict(enumerate(b))
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, where + ".")
        elif a != b:
            found.append(f"{where}: {a!r} -> {b!r}")
    return found


def _assign(raw: dict[str, Any], settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value


class _Lines:
    """Line numbers (1-based) of every key and item of a YAML document, by path from the top."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.lines: dict[tuple, int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            node = None
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[(*path, str(key.value))] = key.start_mark.line + 1
                self._walk(value, (*path, str(key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*path, index))

    def error(self, path: tuple, message: str) -> ConfigError:
        while path and path not in self.lines:
            path = path[:-1]
        line = self.lines.get(path)
        where = f"{self.source}, line {line}" if line else self.source
        return ConfigError(f"{where}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _key_problem(key: Any) -> str | None:
    """Why `key` cannot be set by a sweep, or None."""
    if not isinstance(key, str) or key.count(".") != 1:
        return f"{key!r} is not a config key (section.key, e.g. optim.lr)"
    if key in MOVED_KEYS:
        return f"`{key}` moved to `{MOVED_KEYS[key]}`; write it there"
    valid = all_keys()
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        return f"'{key}' is not a config key" + (f" (did you mean {close[0]}?)" if close else "")
    if key.startswith(SET_BY_THE_SWEEP):
        return f"'{key}' is set by the sweep for each trial (its own folder under SWEEP_DIR/trials/, its resume)"
    return None


class _Parser:
    def __init__(self, lines: _Lines):
        self.lines = lines

    def fail(self, path: tuple, message: str) -> ConfigError:
        return self.lines.error(path, message)

    def mapping(self, value: Any, path: tuple, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"{what} must be a mapping, got {value!r}.")
        return value

    def known(self, body: dict[str, Any], allowed: tuple[str, ...], path: tuple, what: str) -> None:
        for key in body:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise self.fail(
                    (*path, str(key)), f"unknown key '{key}' in {what}{hint}. Valid keys: {', '.join(allowed)}."
                )

    def config_keys(self, body: dict[str, Any], path: tuple) -> None:
        for key in body:
            problem = _key_problem(key)
            if problem:
                raise self.fail((*path, str(key)), problem + ".")

    def param(self, name: Any, body: Any) -> Param:
        path = ("space", str(name))
        kinds = ", ".join(f"{k}: [low, high]" for k in RANGES) + ", " + ", ".join(f"{k}: [...]" for k in CHOICES)
        if not isinstance(body, dict) or len([k for k in body if k in (*RANGES, *CHOICES)]) != 1:
            raise self.fail(path, f"space.{name}: give exactly one of {kinds}; got {body!r}.")
        self.known(body, (*RANGES, *CHOICES, "step"), path, f"space.{name}")
        kind = next(k for k in body if k in (*RANGES, *CHOICES))
        if isinstance(name, str) and "." not in name:
            return self.variants(name, kind, body[kind], (*path, kind))
        problem = _key_problem(name)
        if problem:
            raise self.fail(path, f"space: {problem}. (A name without a dot is a choice of named variants.)")
        if kind in RANGES:
            return self.range(name, kind, body, path)
        if "step" in body:
            raise self.fail((*path, "step"), f"space.{name}: `step` goes with a uniform or int range, not {kind}.")
        values = body[kind]
        if not isinstance(values, list) or not values:
            raise self.fail((*path, kind), f"space.{name}: {kind} needs a non-empty list of values, got {values!r}.")
        if any(isinstance(v, (dict, list)) for v in values) or len({repr(v) for v in values}) != len(values):
            raise self.fail(
                (*path, kind),
                f"space.{name}: {kind} values must be distinct plain values (text, numbers, booleans); got {values!r}. "
                "Several keys at once: a choice of named variants under a name without a dot.",
            )
        return Param(name, kind, values=tuple(values))

    def range(self, name: str, kind: str, body: dict[str, Any], path: tuple) -> Param:
        ends = body[kind]
        integers = kind == "int"
        if (
            not isinstance(ends, list)
            or len(ends) != 2
            or not all(_is_number(v) and (not integers or isinstance(v, int)) for v in ends)
        ):
            wanted = "two integers" if integers else "two numbers"
            raise self.fail((*path, kind), f"space.{name}: {kind} needs [low, high], {wanted}; got {ends!r}.")
        low, high = ends
        if low >= high:
            raise self.fail((*path, kind), f"space.{name}: {kind} range [{low}, {high}] is empty (low must be < high).")
        if kind == "loguniform" and low <= 0:
            raise self.fail((*path, kind), f"space.{name}: loguniform needs low > 0, got {low}.")
        step = body.get("step")
        if step is not None:
            good = _is_number(step) and step > 0 and (not integers or isinstance(step, int))
            if kind == "loguniform" or not good:
                raise self.fail((*path, "step"), f"space.{name}: step {step!r} must be a positive number of the range.")
        return Param(name, kind, low=low, high=high, step=step)

    def variants(self, name: str, kind: str, body: Any, path: tuple) -> Param:
        if kind not in CHOICES or not isinstance(body, dict) or not body:
            raise self.fail(
                path,
                f"space.{name}: a name without a dot is a choice (or grid) of named variants, "
                f"{{variant: {{config.key: value, ...}}, ...}}; got {kind}: {body!r}.",
            )
        variants = {}
        for variant, settings in body.items():
            if not isinstance(variant, str) or not isinstance(settings, dict) or not settings:
                raise self.fail(
                    (*path, str(variant)),
                    f"space.{name}.{variant}: a variant is a name and a mapping of config keys to values.",
                )
            self.config_keys(settings, (*path, variant))
            variants[variant] = dict(settings)
        return Param(name, kind, values=tuple(variants), variants=variants)


def load_sweep_file(
    path: str | Path, overrides: list[str] | None = None, directory: str | Path | None = None
) -> SweepSpec:
    """Read and check a sweep file; `overrides` (key=value) change its base config after its own
    overrides; `directory` replaces its `dir`. Raises ConfigError naming the line of the first mistake."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"sweep file {source} cannot be read ({getattr(err, 'strerror', None) or err}).") from None
    lines = _Lines(text, source)
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(err, 'problem', None) or err}.") from None
    parser = _Parser(lines)
    raw = parser.mapping(raw, (), "a sweep file")
    parser.known(raw, TOP_KEYS, (), "a sweep file")
    for required in ("config", "space"):
        if required not in raw:
            raise parser.fail((), f"the sweep file has no `{required}` (see configs/sweeps/demo.yaml).")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise parser.fail(("name",), f"name {name!r} must be letters, digits, '_', '.' or '-'.")
    if not isinstance(raw["config"], str):
        raise parser.fail(("config",), f"config must be the path of a config file, got {raw['config']!r}.")
    config_path = (path.parent / raw["config"]).resolve()
    if not config_path.is_file():
        raise parser.fail(
            ("config",), f"config {raw['config']!r}: no such file ({config_path}; relative to the sweep file)."
        )

    fixed = parser.mapping(raw.get("overrides") or {}, ("overrides",), "overrides")
    parser.config_keys(fixed, ("overrides",))
    space_body = parser.mapping(raw["space"], ("space",), "space")
    if not space_body:
        raise parser.fail(("space",), "space is empty: give at least one parameter.")
    space = tuple(parser.param(name, body) for name, body in space_body.items())
    _check_overlaps(parser, space, fixed, overrides or [])
    if any(p.kind == "grid" for p in space) and not all(p.kind == "grid" for p in space):
        first = next(p for p in space if p.kind != "grid")
        raise parser.fail(
            ("space", first.name),
            f"space.{first.name}: a grid sweep searches every parameter by grid; {first.name} is {first.kind}.",
        )

    base_raw = read_yaml_config(config_path)
    _assign(base_raw, fixed)
    for section, body in parse_overrides(overrides or []).items():
        base_raw.setdefault(section, {}).update(body)
    base = build_config(base_raw, f"{source}: base config {config_path.name} + overrides", name).to_dict()

    objective = _objective(parser, raw.get("objective") or {}, base)
    grid_size = math.prod(len(p.values) for p in space) if all(p.kind == "grid" for p in space) else None
    trials = raw.get("trials", grid_size)
    if trials is None or not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise parser.fail(("trials",), f"trials must be a positive integer (the number of trials), got {trials!r}.")
    if grid_size is not None and trials > grid_size:
        raise parser.fail(("trials",), f"trials={trials} is more than the grid's {grid_size} points.")
    pruner = _pruner(parser, raw.get("pruner", {}))
    sampler = parser.mapping(raw.get("sampler") or {}, ("sampler",), "sampler")
    parser.known(sampler, ("seed",), ("sampler",), "sampler")
    seed = sampler.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise parser.fail(("sampler", "seed"), f"sampler.seed must be a non-negative integer, got {seed!r}.")
    heartbeat = raw.get("heartbeat_timeout_s", 300.0)
    if not _is_number(heartbeat) or heartbeat <= 0:
        raise parser.fail(
            ("heartbeat_timeout_s",), f"heartbeat_timeout_s must be a positive number, got {heartbeat!r}."
        )
    spec = SweepSpec(
        name=name,
        dir=Path(directory if directory is not None else raw.get("dir") or Path("runs") / "sweeps" / name),
        base=base,
        space=space,
        objective=objective,
        trials=trials,
        pruner=pruner,
        seed=seed,
        heartbeat_timeout_s=float(heartbeat),
        source=source,
    )
    check_samples(spec, lambda param, message: parser.fail(("space", param.name), message))
    return spec


def _check_overlaps(parser: _Parser, space: tuple[Param, ...], fixed: dict[str, Any], overrides: list[str]) -> None:
    """A key is set in one place only: one parameter, or the overrides."""
    owner: dict[str, str] = {}
    for param in space:
        for key in param.keys():
            if key in owner:
                raise parser.fail(("space", param.name), f"space.{param.name} sets {key}, which {owner[key]} sets too.")
            owner[key] = f"space.{param.name}"
    for key in fixed:
        if key in owner:
            raise parser.fail(("overrides", key), f"overrides.{key}: {key} is searched by {owner[key]}.")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in owner:
            raise ConfigError(f"command-line override {item!r}: {key} is searched by {owner[key]} of the sweep.")


def _objective(parser: _Parser, body: Any, base: dict[str, Any]) -> Objective:
    path = ("objective",)
    body = parser.mapping(body, path, "objective")
    parser.known(body, ("metric", "split", "direction"), path, "objective")
    metric = body.get("metric", "accuracy")
    if metric not in METRICS:
        raise parser.fail((*path, "metric"), f"objective.metric {metric!r} is not one of {', '.join(METRICS)}.")
    default = "minimize" if metric.endswith("loss") else "maximize"
    direction = DIRECTIONS.get(body.get("direction", default))
    if direction is None:
        raise parser.fail((*path, "direction"), f"objective.direction {body['direction']!r}: maximize or minimize.")
    split = body.get("split", base["data"]["eval_split"])
    if split != base["data"]["eval_split"]:
        raise parser.fail(
            (*path, "split"),
            f"objective.split {split!r}: the trials evaluate on data.eval_split={base['data']['eval_split']!r}; "
            f"set data.eval_split: {split} in the sweep's overrides.",
        )
    return Objective(metric, split, direction)


def _pruner(parser: _Parser, body: Any) -> PrunerSpec:
    path = ("pruner",)
    if body in ("none", None):
        return PrunerSpec(type="none")
    body = parser.mapping(body, path, "pruner (or `pruner: none`)")
    parser.known(body, ("type", "min_epochs", "reduction_factor"), path, "pruner")
    kind = body.get("type", "asha")
    if kind not in PRUNERS:
        raise parser.fail((*path, "type"), f"pruner.type {kind!r} is not one of {', '.join(PRUNERS)}.")
    values = {}
    for key, least in (("min_epochs", 1), ("reduction_factor", 2)):
        value = body.get(key, getattr(PrunerSpec, key))
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise parser.fail((*path, key), f"pruner.{key} must be an integer >= {least}, got {value!r}.")
        values[key] = value
    return PrunerSpec(kind, **values)


def check_samples(spec: SweepSpec, fail) -> None:
    """Resolve the base config with each range's ends and each choice applied (one parameter at a time):
    the schema's own types, bounds and cross-key rules. `fail(param, message)` makes the error."""
    for param in spec.space:
        for value in param.samples():
            raw = spec.trial_config({param.name: value})
            try:
                build_config(raw, f"{param.name}={value!r}", check_data=False)
            except ConfigError as err:
                raise fail(param, f"space.{param.name}: the config refuses {value!r}: {err}") from None
