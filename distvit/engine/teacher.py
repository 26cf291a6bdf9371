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
    kind: str = "soft"
    """distill.type: soft (KL at temperature tau) or hard (the teacher's argmax)."""
    alpha: float = 0.5
    """distill.alpha: the distillation term's share of the loss."""
    tau: float = 1.0
    """distill.tau: the soft term's temperature."""

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


def load_teacher(cfg: DistillConfig, classes: list[str], device: torch.device) -> Teacher | None:
    """The teacher distill.type asks for (None: no distillation), with how the loss weighs it: a distvit
    checkpoint / run directory (rebuilt from its surgery record; its classes must be the dataset's, in
    order), or a timm model whose weights already predict the dataset's classes."""
    if cfg.type == "none":
        return None
    source = os.path.expanduser(cfg.teacher)
    num_classes = len(classes)
    if Path(source).exists():
        from distvit.run.checkpoint_files import load_model

        model, record, payload = load_model(source)
        img_size, mean, std = record.img_size, record.mean, record.std
        if list(payload.get("classes", [])) != list(classes):
            raise ConfigError(
                f"distill.teacher={cfg.teacher!r} was trained on the classes "
                f"{list(payload.get('classes', []))[:5]}..., "
                f"the dataset has {list(classes)[:5]}...: a teacher must predict the same classes in the same order."
            )
    else:
        model = _timm_teacher(cfg, num_classes)
        data_cfg = timm.data.resolve_data_config({}, model=model)
        img_size, mean, std = data_cfg["input_size"][-1], tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(False)
    model = model.to(device).eval().requires_grad_(False)
    return Teacher(model, int(img_size), tuple(mean), tuple(std), cfg.teacher, cfg.type, cfg.alpha, cfg.tau)


def _timm_teacher(cfg: DistillConfig, num_classes: int) -> torch.nn.Module:
    """Hub weights keep their own head (asking timm for num_classes would silently replace it with a
    random one); a local file is loaded with the dataset's class count and must contain that head."""
    weights = cfg.teacher_weights
    try:
        if isinstance(weights, str):
            overlay = {"file": os.path.expanduser(weights), "num_classes": num_classes}
            model = timm.create_model(
                cfg.teacher, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay
            )
        else:
            model = timm.create_model(cfg.teacher, pretrained=True)
    except Exception as err:  # hub download failure, unreadable file or a head of another size
        raise ConfigError(
            f"distill.teacher={cfg.teacher!r}: its weights could not be loaded "
            f"({type(err).__name__}: {str(err)[:300]}). "
            f"Pass distill.teacher_weights=PATH (a file whose head has {num_classes} classes) or a distvit checkpoint."
        ) from None
    if model.num_classes != num_classes:
        raise ConfigError(
            f"distill.teacher={cfg.teacher!r} with hub weights predicts {model.num_classes} classes, the dataset has "
            f"{num_classes}. Use a teacher fine-tuned on this dataset: a distvit run directory, or "
            f"distill.teacher_weights=PATH with a {num_classes}-class head."
        )
    return model
