"""Optimizer and learning-rate schedule from the `optim` config section."""

from __future__ import annotations

import math
import warnings

import torch

from distvit.config import OptimConfig


_EMBEDDINGS = ("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed.")


def layer_depth(name: str, num_blocks: int) -> int:
    """0 for embeddings, i + 1 for block i, num_blocks + 1 for the final norm and the head(s)."""
    if name.startswith(_EMBEDDINGS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, lr_decay: float = 1.0) -> list[dict]:
    """Groups by (depth, decay): no weight decay on norms, biases, position embeddings and tokens; with
    `lr_decay` < 1 each depth gets lr * lr_decay^(top depth - depth). Frozen parameters are left out."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    num_blocks = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name in skip or name.endswith(".bias"))
        depth = layer_depth(name, num_blocks) if lr_decay != 1.0 else 0
        group = groups.setdefault((depth, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * lr_decay ** (num_blocks + 1 - depth) if lr_decay != 1.0 else lr,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def lr_multiplier(cfg: OptimConfig, global_batch: int) -> float:
    """Factor applied to optim.lr and min_lr for the run's global batch (optim.lr_scale)."""
    ratio = global_batch / cfg.lr_base_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scale]


def _fused_supported(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: fused kernels were CUDA-only
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, lr_decay: float = 1.0, global_batch: int | None = None,
) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters, with lr scaled for `global_batch` (optim.lr_scale).
    Build it after the model is on its device: the fused AdamW kernel is chosen per device."""
    lr = cfg.lr * (lr_multiplier(cfg, global_batch) if global_batch else 1.0)
    groups = param_groups(model, cfg.weight_decay, lr, lr_decay)
    if cfg.name == "adamw":
        device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
        fused = cfg.fused if cfg.fused is not None else _fused_supported(device)
        if fused and not _fused_supported(device):
            warnings.warn(f"optim.fused=true: no fused AdamW for {device.type} in torch {torch.__version__}; using the foreach kernel.")
            fused = False
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=fused or None)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    raise AssertionError(cfg.name)  # the config validates the choices


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, min_factor: float,
    milestones: tuple[int, ...] = (), gamma: float = 0.1,
) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule
    (cosine to min_factor; step: gamma^(milestones passed); constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule. Step it once per optimizer step on every rank (never prepare() it:
    a prepared scheduler steps once per process)."""
    total = steps_per_epoch * epochs
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    min_factor = cfg.min_lr / cfg.lr
    milestones = tuple(round(e * steps_per_epoch) for e in cfg.step_epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule, min_factor, milestones, cfg.step_gamma)
    )
