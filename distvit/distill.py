"""The distillation teacher (DeiT): a frozen model whose predictions the student also learns from.

The teacher sees the same augmented, mixed batch as the student, resized and re-normalised to its own
input size and statistics, so teacher and student may differ in resolution (e.g. a 224 px teacher for
a 32 px student).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from distvit.config import DistillConfig
from distvit.errors import ConfigError


@dataclass
class Teacher:
    model: torch.nn.Module
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @torch.no_grad()
    def logits(self, x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        """Teacher logits for the student's normalised input `x` (statistics `mean`, `std`)."""
        if tuple(mean) != tuple(self.mean) or tuple(std) != tuple(self.std):
            x = x * _column(std, x) + _column(mean, x)
            x = (x - _column(self.mean, x)) / _column(self.std, x)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return self.model(x)


def _column(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


def load_teacher(cfg: DistillConfig, num_classes: int, device: torch.device) -> Teacher:
    """A distvit checkpoint / run directory (rebuilt from its surgery record), or a timm model with weights."""
    source = os.path.expanduser(cfg.teacher)
    if Path(source).exists():
        from distvit.checkpoint import load_model

        model, record, _ = load_model(source)
        img_size, mean, std = record.img_size, record.mean, record.std
        classes = record.num_classes
    else:
        pretrained = cfg.teacher_weights
        overlay = {"file": os.path.expanduser(pretrained)} if isinstance(pretrained, str) else None
        try:
            model = timm.create_model(
                cfg.teacher, pretrained=True, num_classes=num_classes,
                **({"pretrained_cfg_overlay": {**overlay, "num_classes": num_classes}} if overlay else {}),
            )
        except Exception as err:  # hub download failure, unreadable file: both user-fixable
            raise ConfigError(
                f"distill.teacher={cfg.teacher!r}: its weights could not be loaded ({type(err).__name__}: {err}). "
                f"Pass distill.teacher_weights=PATH (a file whose head has {num_classes} classes) or a distvit checkpoint."
            ) from None
        data_cfg = timm.data.resolve_data_config({}, model=model)
        img_size, mean, std = data_cfg["input_size"][-1], tuple(data_cfg["mean"]), tuple(data_cfg["std"])
        classes = model.num_classes
    if classes != num_classes:
        raise ConfigError(
            f"distill.teacher={cfg.teacher!r} predicts {classes} classes, the dataset has {num_classes}. "
            f"Use a teacher fine-tuned on this dataset (e.g. a distvit run directory)."
        )
    if isinstance(model, torch.nn.Module) and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(False)
    model = model.to(device).eval().requires_grad_(False)
    return Teacher(model, int(img_size), tuple(mean), tuple(std), cfg.teacher)
