"""Builds the model from the config and records what was built (the surgery record).

The record is everything needed to rebuild the same architecture without the config or the pretrained
weights: evaluation, prediction and resume recreate the model from the record stored in a checkpoint,
then load its weights. Here the surgery is what timm can do at creation time: new input size and patch
size (timm resamples pos_embed and the patch kernel from the original pretrained weights), a head for the
dataset's classes, drop-path.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from distvit.config import Config, ModelConfig, SurgeryConfig
from distvit.errors import CheckpointError, ConfigError, DistvitError

RECORD_VERSION = 2
PLAN_FIELDS = (
    "model_name", "num_classes", "img_size", "patch_size", "head", "pos_embed", "freeze", "freeze_embeddings",
    "drop_path", "lr_decay", "pretrained",
)


@dataclass
class SurgeryRecord:
    model_name: str
    num_classes: int
    img_size: int
    patch_size: int
    head: str
    pos_embed: str
    freeze: str
    freeze_embeddings: bool
    drop_path: float
    lr_decay: float
    pretrained: str
    """'none', 'hub', or the local weights file the model started from."""
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    num_params: int
    trainable_params: int
    flops_per_image: int
    """Forward FLOPs per image (2 x multiply-adds of the matmuls)."""
    fingerprint: str
    """sha256 of the plan and every parameter right after surgery: equal on every rank."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    timm_version: str = timm.__version__
    version: int = RECORD_VERSION

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SurgeryRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - fields
        if unknown or raw.get("version") != RECORD_VERSION:
            raise CheckpointError(
                f"surgery record version {raw.get('version')} with keys {sorted(unknown)} was written by another "
                f"distvit version; this one reads version {RECORD_VERSION}."
            )
        raw = dict(raw)
        raw["grid_size"] = tuple(raw["grid_size"])
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return cls(**raw)

    def plan(self) -> dict[str, Any]:
        """The surgery as configured (what the fingerprint covers besides the weights)."""
        return {k: getattr(self, k) for k in PLAN_FIELDS}

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be loaded (shapes) or resumed (plus what trains)."""
        return {
            k: getattr(self, k)
            for k in ("model_name", "num_classes", "img_size", "patch_size", "pos_embed", "freeze", "freeze_embeddings")
        }


def _native_geometry(model_name: str) -> tuple[int, int, int]:
    """(native img_size, native patch_size, default num_classes) of a timm ViT, built on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    if not isinstance(model, VisionTransformer) or getattr(model, "pos_embed", None) is None:
        raise ConfigError(
            f"model.name={model_name!r} is a {type(model).__name__}"
            f"{' without absolute position embeddings' if isinstance(model, VisionTransformer) else ''}; distvit "
            f"supports timm VisionTransformer models with absolute position embeddings (e.g. deit_tiny_patch16_224, deit_small_patch16_224, "
            f"deit_base_patch16_224, their _distilled_ variants, vit_*_patch16_224)."
        )
    return model.patch_embed.img_size[0], model.patch_embed.patch_size[0], model.num_classes


def check_model_config(model_cfg: ModelConfig, surgery_cfg: SurgeryConfig, num_classes: int) -> None:
    """Fail early (before any rank starts) on an unknown model or an impossible geometry."""
    if not timm.is_model(model_cfg.name):
        close = difflib.get_close_matches(model_cfg.name, timm.list_models("*vit*") + timm.list_models("deit*"), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models('deit*')`."
        raise ConfigError(f"model.name={model_cfg.name!r} is not a timm model.{hint}")
    native_img, native_patch, default_classes = _native_geometry(model_cfg.name)
    img_size = surgery_cfg.img_size or native_img
    patch_size = surgery_cfg.patch_size or native_patch
    if img_size % patch_size:
        which = "surgery.img_size" if surgery_cfg.img_size else f"the native img_size of {model_cfg.name}"
        raise ConfigError(
            f"{which} ({img_size}) is not divisible by the patch size {patch_size} "
            f"({'surgery.patch_size' if surgery_cfg.patch_size else 'native to ' + model_cfg.name}). "
            f"Choose an img_size that is a multiple of {patch_size}, or set surgery.patch_size."
        )
    if surgery_cfg.head == "keep" and num_classes != default_classes:
        raise ConfigError(
            f"surgery.head=keep keeps {model_cfg.name}'s {default_classes}-class head, but the dataset has "
            f"{num_classes} classes. Use surgery.head=reinit."
        )


def _pretrained_kwargs(model_cfg: ModelConfig) -> tuple[dict[str, Any], str]:
    if model_cfg.pretrained is False:
        return {"pretrained": False}, "none"
    if model_cfg.pretrained is True:
        return {"pretrained": True}, "hub"
    path = Path(model_cfg.pretrained).resolve()
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}, str(path)


def build_model(cfg: Config, num_classes: int) -> tuple[torch.nn.Module, SurgeryRecord]:
    """Create the configured model for `num_classes` classes from the original weights, then apply the
    surgery (geometry, position embeddings, freezing); deterministic given the torch seed."""
    model_cfg, surgery_cfg = cfg.model, cfg.surgery
    check_model_config(model_cfg, surgery_cfg, num_classes)
    pretrained_kwargs, pretrained_source = _pretrained_kwargs(model_cfg)
    head_classes = {"num_classes": num_classes} if surgery_cfg.head == "reinit" else {}
    dynamic = {"dynamic_img_size": True} if surgery_cfg.pos_embed == "dynamic" else {}
    try:
        model = timm.create_model(
            model_cfg.name, **pretrained_kwargs, **head_classes, **dynamic, drop_path_rate=surgery_cfg.drop_path
        )
    except Exception as err:  # hub and file loaders raise many types; random init errors are bugs
        if pretrained_source == "none":
            raise
        if pretrained_source == "hub":
            raise DistvitError(
                f"could not load pretrained weights for {model_cfg.name} from the hub ({type(err).__name__}: {err}). "
                f"Without network access, download them where you can (timm.create_model('{model_cfg.name}', "
                f"pretrained=True) then torch.save(model.state_dict(), 'weights.pth')) and set "
                f"model.pretrained=/path/to/weights.pth."
            ) from None
        raise _unusable_weights(pretrained_source, model_cfg.name, f"{type(err).__name__}: {err}") from None
    if pretrained_source not in ("none", "hub"):
        _check_file_covers_model(pretrained_source, model, reinit_head=surgery_cfg.head == "reinit")
    apply_geometry(model, surgery_cfg.img_size, surgery_cfg.patch_size, surgery_cfg.pos_embed)
    apply_freeze(model, surgery_cfg.freeze, surgery_cfg.freeze_embeddings)
    return model, make_record(model, cfg, pretrained_source)


def apply_geometry(model: VisionTransformer, img_size: int | None, patch_size: int | None, pos_embed: str) -> None:
    """New input size / patch size, from the model's current (original) weights in one step.

    interpolate: timm's set_input_size (bicubic pos_embed resample, PI-resize of the patch kernel);
    truncate: the same patch kernel, but pos_embed = the first prefix + N positions of the original, as the
    lesson did by hand (the top rows of the grid, not a smaller layout); reinit: fresh position embeddings;
    dynamic: the model keeps its grid and resamples to the input size at every forward."""
    native_img, native_patch = model.patch_embed.img_size[0], model.patch_embed.patch_size[0]
    img_size, patch_size = img_size or native_img, patch_size or native_patch
    if (img_size, patch_size) == (native_img, native_patch):
        return
    if pos_embed == "dynamic":
        if patch_size != native_patch:
            raise ConfigError(
                "surgery.pos_embed=dynamic keeps the native patch size (it resamples position embeddings per "
                "input size); use surgery.pos_embed=interpolate to change surgery.patch_size."
            )
        return  # the model keeps its original grid; every forward resamples it to the input's grid
    original = model.pos_embed.detach().clone()
    model.set_input_size(img_size=(img_size, img_size), patch_size=(patch_size, patch_size))
    tokens = model.pos_embed.shape[1]
    with torch.no_grad():
        if pos_embed == "truncate":
            if tokens > original.shape[1]:
                raise ConfigError(
                    f"surgery.pos_embed=truncate keeps the first {tokens} of the model's {original.shape[1]} position "
                    f"embeddings, but the new grid needs more; use interpolate."
                )
            model.pos_embed.copy_(original[:, :tokens])
        elif pos_embed == "reinit":
            torch.nn.init.trunc_normal_(model.pos_embed, std=0.02)


def apply_freeze(model: VisionTransformer, freeze: str, freeze_embeddings: bool) -> None:
    """none / backbone (only the classifier trains) / blocks:K (the last K blocks, final norm and head train)."""
    if freeze == "none" and not freeze_embeddings:
        return
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    trainable: set[int] = {id(p) for head in heads for p in head.parameters()}
    if freeze == "none":
        trainable = {id(p) for p in model.parameters()}
    elif freeze.startswith("blocks:"):
        keep = int(freeze.split(":")[1])
        if keep > len(model.blocks):
            raise ConfigError(f"surgery.freeze={freeze}: {model.default_cfg.get('architecture')} has only {len(model.blocks)} blocks.")
        for module in list(model.blocks[len(model.blocks) - keep:]) + [model.norm, model.fc_norm]:
            trainable |= {id(p) for p in module.parameters()}
    embeddings = {id(p) for p in model.patch_embed.parameters()}
    embeddings |= {id(t) for t in (model.pos_embed, model.cls_token, getattr(model, "dist_token", None), model.reg_token) if t is not None}
    if freeze_embeddings or freeze != "none":
        trainable -= embeddings
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def transformer_flops(model: VisionTransformer, grid: tuple[int, int]) -> int:
    """Forward FLOPs per image on a `grid` of patches: patch embedding, attention and MLP matmuls, head
    (2 x multiply-adds)."""
    patches = grid[0] * grid[1]
    tokens = patches + model.num_prefix_tokens
    dim = model.embed_dim
    patch = model.patch_embed.patch_size
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    per_block = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp_hidden
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    head_macs = sum(h.in_features * h.out_features for h in heads if isinstance(h, torch.nn.Linear))
    macs = len(model.blocks) * per_block + patches * 3 * patch[0] * patch[1] * dim + head_macs
    return 2 * macs


def fingerprint(model: torch.nn.Module, plan: dict[str, Any]) -> str:
    """sha256 of the surgery plan and every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name, param in sorted(model.named_parameters()):
        digest.update(f"{name}:{param.requires_grad}".encode())
    return digest.hexdigest()


def _unusable_weights(path: str, model_name: str, reason: str) -> DistvitError:
    return DistvitError(
        f"model.pretrained={path}: cannot load it into {model_name} ({reason}). The file must hold a "
        f"state dict of that architecture (.pth/.bin/.safetensors, optionally under a 'model' or "
        f"'state_dict' key)."
    )


def _check_file_covers_model(path: str, model: VisionTransformer, reinit_head: bool) -> None:
    """timm loads a file whose head is replaced non-strictly, so a file with other key names would leave
    the model silently random: require every weight except the new head to come from the file."""
    try:
        state = timm.models.load_state_dict(path)
    except Exception as err:
        raise _unusable_weights(path, model.default_cfg.get("architecture", "the model"), f"{type(err).__name__}: {err}") from None
    classifier = model.pretrained_cfg.get("classifier", "head")
    head_prefixes = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    missing = [
        name for name in model.state_dict()
        if name not in state and not (reinit_head and name.startswith(head_prefixes))
    ]
    if missing:
        raise _unusable_weights(
            path, type(model).__name__,
            f"the file lacks {len(missing)} of the model's {len(model.state_dict())} tensors, e.g. "
            f"{', '.join(missing[:3])}; its keys start with {', '.join(sorted(state)[:3])}",
        )


def make_record(model: VisionTransformer, cfg: Config, pretrained_source: str) -> SurgeryRecord:
    surgery = cfg.surgery
    patch = model.patch_embed.patch_size[0]
    # dynamic models keep their native grid; the data pipeline still resizes to the configured size
    img_size = surgery.img_size if surgery.pos_embed == "dynamic" and surgery.img_size else model.patch_embed.img_size[0]
    grid = (img_size // patch, img_size // patch)
    plan = {
        "model_name": cfg.model.name, "num_classes": model.num_classes, "img_size": img_size,
        "patch_size": patch, "head": surgery.head, "pos_embed": surgery.pos_embed,
        "freeze": surgery.freeze, "freeze_embeddings": surgery.freeze_embeddings, "drop_path": surgery.drop_path,
        "lr_decay": surgery.lr_decay,
        "pretrained": pretrained_source,
    }
    return SurgeryRecord(
        **plan,
        grid_size=grid,
        num_prefix_tokens=model.num_prefix_tokens,
        num_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops_per_image=transformer_flops(model, grid),
        fingerprint=fingerprint(model, plan),
        mean=tuple(model.pretrained_cfg.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(model.pretrained_cfg.get("std", (0.5, 0.5, 0.5))),
    )


def model_from_record(record: SurgeryRecord) -> torch.nn.Module:
    """The architecture described by `record`, randomly initialised (load a state dict into it)."""
    model = timm.create_model(
        record.model_name,
        pretrained=False,
        num_classes=record.num_classes,
        drop_path_rate=record.drop_path,
        **({"dynamic_img_size": True} if record.pos_embed == "dynamic" else {}),
    )
    apply_geometry(model, record.img_size, record.patch_size, "interpolate" if record.pos_embed != "dynamic" else "dynamic")
    apply_freeze(model, record.freeze, record.freeze_embeddings)
    return model


def plan_report(model: VisionTransformer, record: SurgeryRecord, global_batch: int) -> str:
    """Human-readable surgery plan with estimates and warnings."""
    params, trainable = record.num_params, record.trainable_params
    # AdamW training: fp32 weights + grads + two moments for trainable parameters, weights only otherwise
    state_bytes = 4 * params + 12 * trainable
    heads = model.blocks[0].attn.num_heads
    tokens = record.tokens_per_image
    # stored activations per image and block, bf16: ~16 token x dim tensors plus two attention maps
    activation_bytes = len(model.blocks) * (16 * tokens * model.embed_dim + 2 * heads * tokens * tokens) * 2
    lines = [
        f"model            {record.model_name} ({'random init' if record.pretrained == 'none' else record.pretrained + ' weights'}), "
        f"head {record.head} -> {record.num_classes} classes",
        f"input            {record.img_size} px, patch {record.patch_size}: grid {record.grid_size[0]}x{record.grid_size[1]}, "
        f"{tokens} tokens per image ({record.num_prefix_tokens} prefix)",
        f"position embed   {record.pos_embed}",
        f"parameters       {params:,} total, {trainable:,} trainable (freeze={record.freeze}"
        f"{', embeddings frozen' if record.freeze_embeddings else ''})",
        f"FLOPs per image  {record.flops_per_image / 1e9:.3f} GFLOP forward, ~{3 * record.flops_per_image / 1e9:.3f} forward+backward",
        f"memory estimate  {state_bytes / 2**20:.0f} MiB weights+grads+AdamW state; ~{activation_bytes / 2**20:.1f} MiB "
        f"activations per image in bf16 ({global_batch} images: ~{activation_bytes * global_batch / 2**30:.2f} GiB over all ranks)",
        f"fingerprint      {record.fingerprint}",
    ]
    for warning in plan_warnings(record):
        lines.append(f"warning          {warning}")
    return "\n".join(lines)


def plan_warnings(record: SurgeryRecord) -> list[str]:
    warnings = []
    grid = record.grid_size[0]
    if grid <= 3:
        better = max(2, record.img_size // 8)
        warnings.append(
            f"a {grid}x{grid} token grid ({record.img_size} px at patch {record.patch_size}) leaves the transformer "
            f"almost nothing to attend over; use surgery.patch_size={better} (grid 8x8) or a larger img_size "
            f"(e.g. 112 or 128 at patch 16)."
        )
    native_patch = _native_geometry(record.model_name)[1]
    if record.pretrained != "none" and record.patch_size < native_patch:
        warnings.append(
            f"shrinking pretrained patches {native_patch} -> {record.patch_size} px resamples the kernel by a "
            f"least-squares fit (large error, unlike growing them); expect to fine-tune all layers "
            f"(surgery.freeze=none)."
        )
    if record.pos_embed == "truncate":
        warnings.append(
            "pos_embed=truncate keeps the first positions of the original grid's top rows (the lesson's slice), "
            "not a smaller layout; interpolate keeps the geometry."
        )
    return warnings
