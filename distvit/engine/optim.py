"""Optimizer and learning-rate schedule from the `optim` config section: the schedule is planned here, once
(`Schedule`), for the scheduler and for what a resume says about it."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

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


def effective_lr(cfg: OptimConfig, global_batch: int) -> tuple[float, str]:
    """The peak lr the run trains with (optim.lr scaled for the global batch), and how it was scaled
    (' (optim.lr 0.0005 x 2, lr_scale=linear)'; '' without scaling), for the start line."""
    multiplier = lr_multiplier(cfg, global_batch)
    how = f" (optim.lr {cfg.lr:g} x {multiplier:.4g}, lr_scale={cfg.lr_scale})" if cfg.lr_scale != "none" else ""
    return cfg.lr * multiplier, how


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


@dataclass(frozen=True)
class Schedule:
    """The lr schedule of a run, planned in optimizer steps over its epochs: the multiplier of the peak lr
    at every step. The scheduler follows it; a resume re-plans it `over` another number of epochs."""

    cfg: OptimConfig
    steps_per_epoch: int
    epochs: int

    @property
    def lr(self) -> float:
        """optim.lr: the peak the multipliers apply to (before optim.lr_scale)."""
        return self.cfg.lr

    def over(self, epochs: int) -> Schedule:
        return Schedule(self.cfg, self.steps_per_epoch, epochs)

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step `step` (0-based)."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        total = per_epoch * self.epochs
        warmup = min(total, round(cfg.warmup_epochs * per_epoch))
        milestones = tuple(round(e * per_epoch) for e in cfg.step_epochs)
        return lr_factor(step, total, warmup, cfg.schedule, cfg.min_lr / cfg.lr, milestones, cfg.step_gamma)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Per-optimizer-step schedule. Step it once per optimizer step on every rank (never prepare() it:
        a prepared scheduler steps once per process). A LambdaLR, not timm's schedulers: its step count
        travels in the checkpoint, where timm's step-based ones must be fed the update count. A lambda,
        not this object: LambdaLR saves (and a resume would restore) the attributes of callable objects,
        and a resume must keep its own plan."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factor(step))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler of the schedule planned from `cfg` over `epochs` epochs (see Schedule)."""
    return Schedule(cfg, steps_per_epoch, epochs).scheduler(optimizer)
