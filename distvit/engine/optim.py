"""Optimizer and learning-rate schedule from the `optim` config section."""

from __future__ import annotations

import math
import warnings

import torch
from timm.optim._param_groups import param_groups_layer_decay

from distvit.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, lr_decay: float = 1.0) -> list[dict]:
    """No weight decay on norms, biases, position embeddings and tokens; frozen parameters are left out.
    With `lr_decay` < 1, timm's layer-wise grouping (it knows each timm model's stem, blocks and head from
    its group_matcher) gives each layer lr * lr_decay^(layers above it). Groups are ordered by (lr, decay)
    as distvit always ordered them, so optimizer states keep their layout."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if lr_decay != 1.0:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=lr_decay)
        for group in groups:
            group["lr"] = lr * group.pop("lr_scale")
        return sorted(groups, key=lambda group: (group["lr"], group["weight_decay"] > 0))
    decays: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays[not (param.ndim <= 1 or name in skip or name.endswith(".bias"))].append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr}
        for decay, params in sorted(decays.items())
        if params
    ]


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
    model: torch.nn.Module, cfg: OptimConfig, lr_decay: float = 1.0, global_batch: int | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters, with lr scaled for `global_batch` (optim.lr_scale).
    Build it after the model is on its device: the fused AdamW kernel is chosen per device."""
    lr = cfg.lr * (lr_multiplier(cfg, global_batch) if global_batch else 1.0)
    groups = param_groups(model, cfg.weight_decay, lr, lr_decay)
    if cfg.name == "adamw":
        device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
        fused = cfg.fused if cfg.fused is not None else _fused_supported(device)
        if fused and not _fused_supported(device):
            warnings.warn(
                f"optim.fused=true: no fused AdamW for {device.type} in torch {torch.__version__}; "
                "using the foreach kernel."
            )
            fused = False
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=fused or None)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    raise AssertionError(cfg.name)  # the config validates the choices


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_factor: float,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
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
    a prepared scheduler steps once per process). A LambdaLR of `lr_factor`, not timm's schedulers: its
    step count travels in the checkpoint, where timm's step-based ones must be fed the update count."""
    total = steps_per_epoch * epochs
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    min_factor = cfg.min_lr / cfg.lr
    milestones = tuple(round(e * steps_per_epoch) for e in cfg.step_epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule, min_factor, milestones, cfg.step_gamma)
    )
