"""The surgery record: everything needed to rebuild a model's architecture without the config or the
pretrained weights (evaluation, prediction and resume rebuild the model from the record stored in a
checkpoint, then load its weights), with its cost (FLOPs) and a fingerprint that ranks compare."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from distvit.config import SurgeryConfig
from distvit.errors import CheckpointError

RECORD_VERSION = 2
PLAN_FIELDS = (
    "model_name",
    "num_classes",
    "img_size",
    "patch_size",
    "head",
    "pos_embed",
    "freeze",
    "freeze_embeddings",
    "drop_path",
    "lr_decay",
    "pretrained",
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
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(raw))
        if missing:
            raise CheckpointError(f"the surgery record is incomplete: {', '.join(missing)} missing.")
        raw = dict(raw)
        try:
            raw["grid_size"] = tuple(raw["grid_size"])
            raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        except TypeError as err:
            raise CheckpointError(
                f"the surgery record is damaged: grid_size, mean and std must be lists ({err})."
            ) from None
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


def make_record(
    model: VisionTransformer, model_name: str, surgery: SurgeryConfig, pretrained_source: str
) -> SurgeryRecord:
    patch = model.patch_embed.patch_size[0]
    # dynamic models keep their native grid; the data pipeline still resizes to the configured size
    img_size = (
        surgery.img_size if surgery.pos_embed == "dynamic" and surgery.img_size else model.patch_embed.img_size[0]
    )
    grid = (img_size // patch, img_size // patch)
    plan = {
        "model_name": model_name,
        "num_classes": model.num_classes,
        "img_size": img_size,
        "patch_size": patch,
        "head": surgery.head,
        "pos_embed": surgery.pos_embed,
        "freeze": surgery.freeze,
        "freeze_embeddings": surgery.freeze_embeddings,
        "drop_path": surgery.drop_path,
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
