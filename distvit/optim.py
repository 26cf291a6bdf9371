"""Optimizer and learning-rate schedule from the `optim` config section."""

from __future__ import annotations

import math

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


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr_decay: float = 1.0) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr, lr_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise AssertionError(cfg.name)  # the config validates the choices


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_factor: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
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
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule, min_factor)
    )
