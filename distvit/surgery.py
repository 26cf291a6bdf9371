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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from distvit.config import Config, ModelConfig, SurgeryConfig
from distvit.errors import CheckpointError, ConfigError, DistvitError

RECORD_VERSION = 1


@dataclass
class SurgeryRecord:
    model_name: str
    num_classes: int
    img_size: int
    patch_size: int
    head: str
    drop_path: float
    pretrained: str
    """'none', 'hub', or the local weights file the model started from."""
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    num_params: int
    trainable_params: int
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

    def architecture(self) -> dict[str, Any]:
        """The fields that fix parameter shapes: two records with equal architecture share a state dict."""
        return {k: getattr(self, k) for k in ("model_name", "num_classes", "img_size", "patch_size")}


def _native_geometry(model_name: str) -> tuple[int, int, int]:
    """(native img_size, native patch_size, default num_classes) of a timm ViT, built on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"model.name={model_name!r} is a {type(model).__name__}; distvit supports timm VisionTransformer "
            f"models with absolute position embeddings (e.g. deit_tiny_patch16_224, deit_small_patch16_224, "
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
    """Create the configured model for `num_classes` classes, deterministically given the torch seed."""
    model_cfg, surgery_cfg = cfg.model, cfg.surgery
    check_model_config(model_cfg, surgery_cfg, num_classes)
    pretrained_kwargs, pretrained_source = _pretrained_kwargs(model_cfg)
    geometry = {}
    if surgery_cfg.img_size:
        geometry["img_size"] = surgery_cfg.img_size
    if surgery_cfg.patch_size:
        geometry["patch_size"] = surgery_cfg.patch_size
    head_classes = {"num_classes": num_classes} if surgery_cfg.head == "reinit" else {}
    try:
        model = timm.create_model(
            model_cfg.name, **pretrained_kwargs, **geometry, **head_classes, drop_path_rate=surgery_cfg.drop_path
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
    return model, make_record(model, cfg, pretrained_source)


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
    return SurgeryRecord(
        model_name=cfg.model.name,
        num_classes=model.num_classes,
        img_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        head=cfg.surgery.head,
        drop_path=cfg.surgery.drop_path,
        pretrained=pretrained_source,
        grid_size=tuple(model.patch_embed.grid_size),
        num_prefix_tokens=model.num_prefix_tokens,
        num_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        mean=tuple(model.pretrained_cfg.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(model.pretrained_cfg.get("std", (0.5, 0.5, 0.5))),
    )


def model_from_record(record: SurgeryRecord) -> torch.nn.Module:
    """The architecture described by `record`, randomly initialised (load a state dict into it)."""
    return timm.create_model(
        record.model_name,
        pretrained=False,
        num_classes=record.num_classes,
        img_size=record.img_size,
        patch_size=record.patch_size,
        drop_path_rate=record.drop_path,
    )
