"""Typed run configuration: dataclasses, loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.epochs=2"])

Types, bounds and choices are declared on the dataclass fields and checked by pydantic; unknown keys
are rejected with the nearest valid key as a suggestion; cross-field rules (`img_size` divisible by
`patch_size`, a dataset folder with a manifest) are checked in `_check_semantics`. Every failure is a
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

try:
    import pydantic
    from pydantic import Field
except ImportError:  # `launch/gpu_check.py` runs where only torch, torchvision, timm and accelerate are installed
    pydantic = None

    def Field(**constraints: Any) -> tuple:  # noqa: N802 - stands in for pydantic.Field (hashable, as typing needs)
        return tuple(sorted(constraints.items()))

from distvit.data.manifest import MANIFEST_NAME
from distvit.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]


@dataclass
class RunConfig:
    dir: str = ""
    """Run directory (config.yaml, metrics.jsonl, checkpoints/). Empty: runs/<config file stem>."""
    overwrite: bool = False
    """Allow starting a new run in a directory that already holds one (its files are replaced)."""


@dataclass
class ModelConfig:
    name: str = "deit_tiny_patch16_224"
    """A timm model name (VisionTransformer family)."""
    pretrained: Union[bool, str] = False
    """true: timm's hub weights; false: random init; a path: local weights file (.pth/.bin/.safetensors)."""
    fused_attn: Optional[bool] = None
    """Fused attention (F.scaled_dot_product_attention). Empty: timm's default (on where available);
    true where unavailable falls back to the plain implementation with a warning."""


@dataclass
class SurgeryConfig:
    img_size: Optional[PositiveInt] = None
    """Model input size in pixels. Empty: the model's native size."""
    patch_size: Optional[PositiveInt] = None
    """Patch size in pixels. Empty: the model's native patch size."""
    head: Literal["reinit", "keep"] = "reinit"
    """reinit: new classifier for the dataset's classes; keep: the model's head (class counts must match)."""
    pos_embed: Literal["interpolate", "truncate", "reinit", "dynamic"] = "interpolate"
    """How position embeddings follow a new token grid: interpolate (bicubic, from the original weights),
    truncate (the lesson's pos_embed[:, :prefix + tokens], for comparison), reinit (fresh), dynamic
    (resampled to the input size at every forward)."""
    freeze: Annotated[str, Field(pattern=r"^(none|backbone|blocks:[0-9]+)$")] = "none"
    """none; backbone (only the head trains, as in the lesson); blocks:K (embeddings and all but the last K
    blocks frozen)."""
    freeze_embeddings: bool = False
    """Also freeze patch embedding, position embedding and prefix tokens (implied by backbone and blocks:K)."""
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Stochastic depth rate."""
    lr_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Layer-wise lr decay: head and final norm train at optim.lr, block i of L at lr * decay^(L - i),
    embeddings at lr * decay^(L + 1). 1.0: one lr for all."""


@dataclass
class DataConfig:
    path: str = ""
    """Dataset folder holding manifest.json and the shards (made by `distvit prepare`)."""
    train_split: str = "train"
    eval_split: str = "test"
    augment: Literal["none", "crop_flip"] = "crop_flip"
    """Training augmentation, applied on the training device: random crop with padding + horizontal flip."""
    crop_padding: NonNegativeInt = 4
    """Padding (pixels at stored size) of the random crop."""
    mode: Literal["auto", "memory", "stream"] = "auto"
    """memory: decode the split once and keep it on the training device; stream: read and decode from the
    shards in loader workers each epoch; auto: memory when the decoded split is at most 4 GiB."""
    num_workers: NonNegativeInt = 2
    """Decoding processes per rank in stream mode (0: in the training process)."""
    remote: str = ""
    """Where the shards live if not in data.path: a URL or `pipe:` command template with {name} (e.g.
    'pipe:aws s3 cp s3://bucket/ds/{name} -'); missing or damaged files are fetched into data.path first."""
    verify: Literal["sha256", "size"] = "sha256"
    """Preflight of the shards before training: sha256 and size (default), or size only (huge datasets)."""
    bad_shards: Literal["error", "skip"] = "error"
    """A missing, truncated or corrupted shard: stop with an error, or leave it out (same shards on all ranks)."""
    trace_samples: bool = False
    """Record the sample indices every rank trains on, per step, in RUN_DIR/trace/rank<N>.jsonl."""
    train_subset: NonNegativeInt = 0
    """Train on a fixed random subset of this many images of the train split (seeded by train.seed;
    the lesson's 10k). 0: the whole split."""
    mixup_alpha: NonNegativeFloat = 0.0
    """Mixup Beta(alpha, alpha) on the training device (0: off)."""
    cutmix_alpha: NonNegativeFloat = 0.0
    """CutMix Beta(alpha, alpha) on the training device (0: off)."""
    mix_prob: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Share of steps that mix (when mixup or cutmix is on)."""
    mix_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5
    """With both on: share of mixing steps that use CutMix instead of Mixup."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 5e-4
    """Peak learning rate."""
    min_lr: NonNegativeFloat = 0.0
    """Learning rate at the end of the cosine schedule."""
    weight_decay: NonNegativeFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum (sgd only)."""
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    """AdamW betas (adamw only)."""
    fused: Optional[bool] = None
    """Fused AdamW kernel (one kernel for all parameters; on CPU ~2x faster than foreach). Empty: on where
    torch has one (CUDA, CPU); true where unsupported falls back with a warning."""
    lr_scale: Literal["none", "linear", "sqrt"] = "none"
    """Scale optim.lr (and min_lr) by the global batch: lr * (batch / lr_base_batch) for linear, its
    square root for sqrt (DeiT: linear with base 512). The effective lr is printed at start."""
    lr_base_batch: PositiveInt = 512
    """The global batch optim.lr is given for (with lr_scale linear or sqrt)."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    """After warmup: cosine to min_lr, step (multiply by step_gamma at each of step_epochs), or constant."""
    step_epochs: list[PositiveFloat] = field(default_factory=list)
    """Epochs (fractions allowed) at which the step schedule multiplies the lr by step_gamma."""
    step_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    warmup_epochs: NonNegativeFloat = 0.0
    """Linear warmup length, in epochs (fractions allowed)."""
    clip_grad_norm: NonNegativeFloat = 0.0
    """Clip the global gradient norm to this value before each optimizer step (0: off)."""


@dataclass
class TrainConfig:
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 128
    """Global batch size: split evenly over the ranks, so results do not depend on the world size."""
    eval_batch_size: PositiveInt = 512
    """Global evaluation batch size."""
    seed: Seed = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """no / bf16 / fp16 (with loss scaling). auto: what `accelerate launch --mixed_precision` (or accelerate
    config) says if it asks for bf16 or fp16, else bf16 on a GPU that supports it, else no (fp32)."""
    log_every: PositiveInt = 10
    """Write a training line to metrics.jsonl every N optimizer steps."""
    eval_every: NonNegativeInt = 1
    """Evaluate every N epochs (0: only after the last epoch; the last epoch is always evaluated)."""
    resume: str = ""
    """Empty: a new run; 'auto': continue from RUN_DIR's newest checkpoint if it has one; or a checkpoint file."""
    stop_at_step: NonNegativeInt = 0
    """Checkpoint and stop after this optimizer step (0: run to the end); continue with train.resume=auto."""
    grad_accum_steps: PositiveInt = 1
    """Split each rank's share of the global batch into this many micro-batches (same optimizer steps,
    less memory); batch_size must be divisible by processes x grad_accum_steps."""
    label_smoothing: Fraction = 0.0
    timeout_s: Annotated[int, Field(ge=10)] = 300
    """Seconds a rank waits in a collective (all-reduce, barrier) before the run stops with an error
    naming the unresponsive rank(s); NCCL's default is 30 minutes. Must exceed the longest rank-0-only
    pause (checkpoint write, W&B start)."""
    compile: Optional[bool] = None
    """torch.compile the model (compile time is reported; falls back to eager with a warning where it
    fails). Empty: on for CUDA, off on CPU (where compiling takes longer than short runs save)."""
    cache_features: Optional[bool] = None
    """Head-only fine-tuning (surgery.freeze=backbone, no augmentation, mixing, drop-path or distillation):
    compute the frozen backbone's features once and train the head on them. Empty: whenever possible;
    true: required (an error says what prevents it); false: full forward every step."""


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "distvit"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    """W&B run name. Empty: the run directory's name."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """auto: online when an API key is configured, else offline (sync later with `wandb sync`)."""


@dataclass
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights, evaluated beside the raw model."""
    decay: Optional[Annotated[float, Field(gt=0, lt=1)]] = None
    """Per-optimizer-step decay. Empty: derived from the run length, 1 - 1 / (horizon x total steps)."""
    horizon: Annotated[float, Field(gt=0, le=1)] = 0.1
    """With decay empty: the EMA's time constant as a share of the run's optimizer steps."""
    warmup: bool = True
    """Use min(decay, (1 + t) / (10 + t)) at step t, so early weights do not dominate."""


@dataclass
class DistillConfig:
    type: Literal["none", "soft", "hard"] = "none"
    """Knowledge distillation as in DeiT: soft (KL at temperature tau) or hard (teacher's argmax)."""
    teacher: str = ""
    """A distvit checkpoint or run directory, or a timm model name (with teacher_weights)."""
    teacher_weights: Union[bool, str] = True
    """For a timm model name: true (hub weights) or a local weights file whose head has the dataset's classes."""
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Loss = (1 - alpha) x label loss + alpha x distillation loss."""
    tau: PositiveFloat = 1.0


@dataclass
class CheckpointConfig:
    every_epochs: NonNegativeInt = 0
    """Also checkpoint every N epochs (0: only the final checkpoint)."""
    every_steps: NonNegativeInt = 0
    """Also checkpoint every N optimizer steps (0: off), mid-epoch included."""
    keep_last: NonNegativeInt = 3
    """Keep the newest N periodic (step/epoch) checkpoints, delete older ones (0: keep all)."""
    keep_best: bool = True
    """Keep best.pt: the checkpoint of the best evaluation (EMA accuracy when ema.enabled)."""
    export: bool = True
    """At the end write RUN_DIR/model.safetensors and model.json (timm.create_model arguments)."""
    stop_check_every: PositiveInt = 10
    """How often (optimizer steps) ranks agree on a stop request (SIGUSR1/SIGTERM or a STOP file)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        plain = dataclasses.asdict(self)
        plain["optim"]["betas"] = list(plain["optim"]["betas"])  # YAML-friendly
        plain["optim"]["step_epochs"] = list(plain["optim"]["step_epochs"])
        return plain

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_YamlLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
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


def _check_known_keys(raw: dict[str, Any], source: str) -> None:
    sections = _section_types()
    for section, body in raw.items():
        if not isinstance(section, str):
            raise ConfigError(f"{source}: config section names must be text, got {section!r}. Valid sections: {', '.join(sections)}.")
        if section not in sections:
            close = difflib.get_close_matches(section, list(sections), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown config section '{section}'{hint}. "
                f"Valid sections: {', '.join(sections)}."
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
            if not isinstance(key, str) or key not in valid:
                raise ConfigError(
                    f"{source}: unknown config key '{section}.{key}'{_suggest(f'{section}.{key}')}. "
                    f"Valid keys in '{section}': {', '.join(valid)}."
                )


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
        lines.append(f"{key}: {problem['msg']} (got {given!r})")
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
    raw: dict[str, Any], source: str = "config", default_run_name: str = "run", check_data: bool = True,
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
    _check_semantics(cfg, source, check_data)
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


def _check_semantics(cfg: Config, source: str, check_data: bool = True) -> None:
    """Rules that involve several keys or the file system."""
    s = cfg.surgery
    if s.img_size is not None and s.patch_size is not None and s.img_size % s.patch_size:
        raise ConfigError(
            f"{source}: surgery.img_size={s.img_size} is not divisible by surgery.patch_size={s.patch_size}. "
            f"Choose an img_size that is a multiple of the patch size (e.g. "
            f"{max(s.patch_size, s.img_size // s.patch_size * s.patch_size)}) or another patch_size."
        )
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"{source}: optim.min_lr={cfg.optim.min_lr} is larger than optim.lr={cfg.optim.lr}; "
            f"min_lr must be between 0 and lr."
        )
    if isinstance(cfg.model.pretrained, str):
        weights = Path(cfg.model.pretrained)
        if not weights.is_file():
            raise ConfigError(
                f"{source}: model.pretrained={cfg.model.pretrained!r} is neither true/false nor an existing "
                f"weights file. Pass true (download from the hub), false (random init) or the path of a "
                f".pth/.safetensors file."
            )
    if cfg.train.resume not in ("", "auto") and not Path(cfg.train.resume).is_file():
        raise ConfigError(
            f"{source}: train.resume={cfg.train.resume!r} is not a checkpoint file. Use 'auto' (the run "
            f"directory's newest checkpoint), a path such as RUN_DIR/checkpoints/step_00000100.pt, or leave it empty."
        )
    _check_schedule(cfg, source)
    _check_distill(cfg, source)
    if check_data:
        _check_data_path(cfg, source)


def _check_schedule(cfg: Config, source: str) -> None:
    o, t = cfg.optim, cfg.train
    if o.schedule == "step" and not o.step_epochs:
        raise ConfigError(
            f"{source}: optim.schedule=step needs optim.step_epochs, the epochs at which the lr is multiplied by "
            f"optim.step_gamma (e.g. optim.step_epochs=[30,60]); or choose schedule cosine or constant."
        )
    if list(o.step_epochs) != sorted(o.step_epochs):
        raise ConfigError(f"{source}: optim.step_epochs={list(o.step_epochs)} must be in increasing order.")
    if o.step_epochs and o.schedule != "step":
        raise ConfigError(f"{source}: optim.step_epochs is set but optim.schedule={o.schedule}; set optim.schedule=step or remove step_epochs.")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"{source}: train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}; "
            f"the global batch is split into that many micro-batches."
        )


def _check_distill(cfg: Config, source: str) -> None:
    d = cfg.distill
    if d.type == "none":
        if d.teacher:
            raise ConfigError(f"{source}: distill.teacher is set but distill.type=none; choose distill.type=soft or hard.")
        return
    if not d.teacher:
        raise ConfigError(
            f"{source}: distill.type={d.type} needs distill.teacher: a distvit checkpoint or run directory, or a "
            f"timm model name such as deit_base_patch16_224 (with distill.teacher_weights)."
        )
    if not Path(os.path.expanduser(d.teacher)).exists():
        import timm

        if not timm.is_model(d.teacher):
            close = difflib.get_close_matches(d.teacher, timm.list_models(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{source}: distill.teacher={d.teacher!r} is neither an existing checkpoint/run directory nor a timm "
                f"model name{hint}."
            )
        if isinstance(d.teacher_weights, str) and not Path(os.path.expanduser(d.teacher_weights)).is_file():
            raise ConfigError(f"{source}: distill.teacher_weights={d.teacher_weights!r} is not a weights file (or true for hub weights).")
        if d.teacher_weights is False:
            raise ConfigError(f"{source}: distill.teacher_weights=false would distil from a random teacher; pass true or a weights file.")


def _check_data_path(cfg: Config, source: str) -> None:
    prepare_hint = "Create a dataset with `distvit prepare synthetic --out DIR` and set data.path=DIR."
    if not cfg.data.path:
        raise ConfigError(f"{source}: data.path is required (the dataset folder with {MANIFEST_NAME}). {prepare_hint}")
    if cfg.data.remote:
        if Path(cfg.data.path).exists() and not Path(cfg.data.path).is_dir():
            raise ConfigError(f"{source}: data.path={cfg.data.path!r} is a file; with data.remote it is the local folder the shards are fetched into.")
        return  # the manifest may still be remote
    folder = Path(cfg.data.path)
    if not folder.exists():
        raise ConfigError(f"{source}: data.path={cfg.data.path!r} does not exist. {prepare_hint}")
    if not folder.is_dir():
        raise ConfigError(f"{source}: data.path={cfg.data.path!r} is a file; it must be the dataset folder. {prepare_hint}")
    if not (folder / MANIFEST_NAME).is_file():
        raise ConfigError(
            f"{source}: data.path={cfg.data.path!r} has no {MANIFEST_NAME}: it is not a distvit dataset, or "
            f"`distvit prepare` did not finish there (the manifest is written last). Run prepare again with "
            f"--out {cfg.data.path}."
        )
