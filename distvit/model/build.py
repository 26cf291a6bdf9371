"""Builds the model from the `model` and `surgery` config sections and records what was built.

The record is everything needed to rebuild the same architecture without the config or the pretrained
weights: evaluation, prediction and resume recreate the model from the record stored in a checkpoint,
then load its weights. Here the surgery is what timm can do at creation time: new input size and patch
size (timm resamples pos_embed and the patch kernel from the original pretrained weights), a head for the
dataset's classes, drop-path.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from distvit.config import ModelConfig, SurgeryConfig
from distvit.errors import CheckpointError, ConfigError, DistvitError
from distvit.model.record import SurgeryRecord, make_record
from distvit.model.surgery import apply_freeze, apply_geometry


def native_geometry(model_name: str) -> tuple[int, int, int]:
    """(native img_size, native patch_size, default num_classes) of a timm ViT, built on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    if not isinstance(model, VisionTransformer) or getattr(model, "pos_embed", None) is None:
        raise ConfigError(
            f"model.name={model_name!r} is a {type(model).__name__}"
            f"{' without absolute position embeddings' if isinstance(model, VisionTransformer) else ''}; distvit "
            f"supports timm VisionTransformer models with absolute position embeddings "
            "(e.g. deit_tiny_patch16_224, deit_small_patch16_224, "
            f"deit_base_patch16_224, their _distilled_ variants, vit_*_patch16_224)."
        )
    return model.patch_embed.img_size[0], model.patch_embed.patch_size[0], model.num_classes


def check_model_config(model_cfg: ModelConfig, surgery_cfg: SurgeryConfig, num_classes: int) -> None:
    """Fail early (before any rank starts) on an unknown model or an impossible geometry."""
    if not timm.is_model(model_cfg.name):
        close = difflib.get_close_matches(model_cfg.name, timm.list_models("*vit*") + timm.list_models("deit*"), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models('deit*')`."
        raise ConfigError(f"model.name={model_cfg.name!r} is not a timm model.{hint}")
    native_img, native_patch, default_classes = native_geometry(model_cfg.name)
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


def build_model(
    model_cfg: ModelConfig, surgery_cfg: SurgeryConfig, num_classes: int
) -> tuple[torch.nn.Module, SurgeryRecord]:
    """Create the configured model for `num_classes` classes, deterministic given the torch seed.

    Pretrained weights: created at their native geometry, then the surgery (geometry, position embeddings)
    resamples them in one step. Random init: timm creates the model at the target geometry itself, so the
    init is timm's for that geometry (resampling random weights would change their statistics)."""
    check_model_config(model_cfg, surgery_cfg, num_classes)
    pretrained_kwargs, pretrained_source = _pretrained_kwargs(model_cfg)
    head_classes = {"num_classes": num_classes} if surgery_cfg.head == "reinit" else {}
    geometry = {"dynamic_img_size": True} if surgery_cfg.pos_embed == "dynamic" else {}
    if pretrained_source == "none" and surgery_cfg.pos_embed != "dynamic":
        geometry = {
            key: value
            for key, value in (("img_size", surgery_cfg.img_size), ("patch_size", surgery_cfg.patch_size))
            if value
        }
    try:
        model = timm.create_model(
            model_cfg.name, **pretrained_kwargs, **head_classes, **geometry, drop_path_rate=surgery_cfg.drop_path
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
    apply_geometry(model, surgery_cfg.img_size, surgery_cfg.patch_size, surgery_cfg.pos_embed)  # no-op when created so
    apply_freeze(model, surgery_cfg.freeze, surgery_cfg.freeze_embeddings)
    return model, make_record(model, model_cfg.name, surgery_cfg, pretrained_source)


def nothing_frozen(cfg: SurgeryConfig) -> bool:
    """Every parameter trains (surgery.freeze=none, embeddings not frozen): DDP's options depend on it."""
    return cfg.freeze == "none" and not cfg.freeze_embeddings


def configure_attention(model: torch.nn.Module, cfg: ModelConfig) -> bool:
    """model.fused_attn on a built model (empty: timm's choice); whether fused attention is in use."""
    return set_fused_attention(model, cfg.fused_attn)


def set_fused_attention(model: torch.nn.Module, enabled: bool | None) -> bool:
    """Switch timm's attention modules between F.scaled_dot_product_attention and the plain path.
    None keeps timm's choice. Returns whether fused attention is in use."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    if enabled and not hasattr(F, "scaled_dot_product_attention"):
        warnings.warn(
            f"model.fused_attn=true: torch {torch.__version__} has no scaled_dot_product_attention; "
            "using plain attention."
        )
        enabled = False
    if enabled is not None:
        for module in modules:
            module.fused_attn = enabled
    return bool(modules) and all(m.fused_attn for m in modules)


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
        raise _unusable_weights(
            path, model.default_cfg.get("architecture", "the model"), f"{type(err).__name__}: {err}"
        ) from None
    classifier = model.pretrained_cfg.get("classifier", "head")
    head_prefixes = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    missing = [
        name
        for name in model.state_dict()
        if name not in state and not (reinit_head and name.startswith(head_prefixes))
    ]
    if missing:
        raise _unusable_weights(
            path,
            type(model).__name__,
            f"the file lacks {len(missing)} of the model's {len(model.state_dict())} tensors, e.g. "
            f"{', '.join(missing[:3])}; its keys start with {', '.join(sorted(state)[:3])}",
        )


def model_from_record(record: SurgeryRecord) -> torch.nn.Module:
    """The architecture described by `record`, randomly initialised (load a state dict into it). Only a
    model of timm's own registry: a record naming a hub model (`hf-hub:...`) would make timm fetch its
    configuration from the network because a file said so."""
    if not isinstance(record.model_name, str) or ":" in record.model_name or not timm.is_model(record.model_name):
        raise CheckpointError(
            f"the checkpoint's surgery record names model {record.model_name!r}, which is not in timm's local "
            f"registry (timm {timm.__version__}): distvit rebuilds only models timm knows without the network."
        )
    model = timm.create_model(
        record.model_name,
        pretrained=False,
        num_classes=record.num_classes,
        drop_path_rate=record.drop_path,
        **({"dynamic_img_size": True} if record.pos_embed == "dynamic" else {}),
    )
    apply_geometry(
        model, record.img_size, record.patch_size, "interpolate" if record.pos_embed != "dynamic" else "dynamic"
    )
    apply_freeze(model, record.freeze, record.freeze_embeddings)
    return model
