"""Mixup and CutMix on the training device, decided per step from the step's seed.

One decision (which kind, lambda, CutMix box) per step, drawn on the CPU from a generator seeded by
(seed, epoch, position): the same on every rank and again after a resume. Each sample is mixed with
its mirror in the rank's batch (`x.flip(0)`), as timm does; so, unlike crop/flip, mixing depends on how
the global batch is split over ranks.

Not timm's `Mixup`: it draws from the global numpy/random state, so a resumed run would mix differently.
This module reads the mix section.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distvit.config import MixConfig


@dataclass(frozen=True)
class MixDecision:
    kind: str
    """'none', 'mixup' or 'cutmix'."""
    lam: float = 1.0
    """Weight of the sample's own image and label (for CutMix: the share of pixels it keeps)."""
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    """CutMix box (top, bottom, left, right) in input pixels, filled from the mirrored sample."""


def mixing_enabled(cfg: MixConfig) -> bool:
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


def mix_settings(cfg: MixConfig) -> dict[str, float]:
    """The section by config key ('mix.prob': 1.0, ...): what checkpoints record of the mixing."""
    return {f"mix.{name}": value for name, value in dataclasses.asdict(cfg).items()}


def sample_mix(cfg: MixConfig, seed: int | list[int], height: int, width: int) -> MixDecision:
    if not mixing_enabled(cfg):
        return MixDecision("none")
    rng = np.random.default_rng(seed)
    if rng.random() >= cfg.prob:
        return MixDecision("none")
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or rng.random() < cfg.switch_prob)
    if not use_cutmix:
        return MixDecision("mixup", float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)))
    lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)  # the box was clipped at the border
    return MixDecision("cutmix", kept, (top, bottom, left, right))


def apply_mix(x: torch.Tensor, decision: MixDecision) -> torch.Tensor:
    """Mix the N x C x H x W batch with its mirror (x.flip(0)) as decided."""
    if decision.kind == "mixup":
        return x.mul(decision.lam).add_(x.flip(0), alpha=1.0 - decision.lam)
    if decision.kind == "cutmix":
        top, bottom, left, right = decision.box
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        return mixed
    return x


def mixed_targets(labels: torch.Tensor, num_classes: int, smoothing: float, decision: MixDecision) -> torch.Tensor:
    """Soft targets matching `apply_mix`: smoothed one-hot labels mixed with their mirror's."""
    off = smoothing / num_classes
    one_hot = F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off
    return one_hot * decision.lam + one_hot.flip(0) * (1.0 - decision.lam)
