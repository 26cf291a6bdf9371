"""The surgery itself: a new token grid (input and patch size) with its position embeddings, and what
trains. Pure functions of a timm VisionTransformer and explicit settings."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from distvit.errors import ConfigError


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
            raise ConfigError(
                f"surgery.freeze={freeze}: {model.default_cfg.get('architecture')} has only {len(model.blocks)} blocks."
            )
        for module in list(model.blocks[len(model.blocks) - keep :]) + [model.norm, model.fc_norm]:
            trainable |= {id(p) for p in module.parameters()}
    embeddings = {id(p) for p in model.patch_embed.parameters()}
    embeddings |= {
        id(t)
        for t in (model.pos_embed, model.cls_token, getattr(model, "dist_token", None), model.reg_token)
        if t is not None
    }
    if freeze_embeddings or freeze != "none":
        trainable -= embeddings
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
