"""Each step's per-sample random choices, drawn on the CPU for the whole global batch from the step's
generator (seeded by seed, epoch and position: see distvit.engine.seeds). A rank takes its slice, so a
sample's augmentation is the same whatever the world size, on a CPU or a GPU, and after a resume.

The draws come in a fixed order, part by part, and a part that is off draws nothing: the crop_flip
preset draws exactly what distvit drew before the augmentation had parts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from distvit.augment.ops import NOISE_TILES
from distvit.augment.randaugment import OPS
from distvit.augment.recipe import Recipe

ATTEMPTS = 10  # tries to place a random-resized crop or an erasing box, as torchvision and timm do
RATIO = (3 / 4, 4 / 3)
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)


@dataclass(frozen=True)
class AugmentParams:
    """One global batch's choices (CPU tensors with one row per sample); None where a part is off."""

    crop_offsets: torch.Tensor | None = None
    """pad crop: (N, 2) top and left offsets in [0, 2 * padding]."""
    flip: torch.Tensor | None = None
    """(N,) bool."""
    crop_boxes: torch.Tensor | None = None
    """resized crop: (N, 4) top, left, height, width in stored pixels."""
    jitter: torch.Tensor | None = None
    """(N, 3) brightness, contrast and saturation factors (1: unchanged)."""
    ra_ops: torch.Tensor | None = None
    """(N, L) index into randaugment.OPS per layer, -1 where the layer's op is skipped."""
    ra_levels: torch.Tensor | None = None
    """(N, L) signed magnitude in [-1, 1] (the magnitude / 10, negated half of the time)."""
    erase_boxes: torch.Tensor | None = None
    """(N, 4) top, left, height, width at the model's input size; height 0: not erased."""
    erase_noise: torch.Tensor | None = None
    """(N, 3) which tile of the noise bank fills the box, and the tile's row and column offset."""

    @classmethod
    def sample(
        cls, recipe: Recipe, batch_size: int, stored: tuple[int, int], size: tuple[int, int], generator: torch.Generator
    ) -> AugmentParams:
        """Draws for `batch_size` samples stored at `stored` (H, W), trained at `size` (H, W)."""
        n, draws = batch_size, {}
        if recipe.crop == "pad":
            draws["crop_offsets"] = torch.randint(0, 2 * recipe.crop_padding + 1, (2, n), generator=generator).T
        if recipe.hflip > 0:
            draws["flip"] = torch.rand(n, generator=generator) < recipe.hflip
        if recipe.crop == "resized":
            draws["crop_boxes"] = _resized_crop_boxes(n, stored, recipe.crop_scale_min, generator)
        if recipe.color_jitter > 0 and recipe.color_jitter_prob > 0:
            s = recipe.color_jitter
            factors = 1 - s + 2 * s * torch.rand(n, 3, generator=generator, dtype=torch.float64)
            on = torch.rand(n, generator=generator) < recipe.color_jitter_prob
            draws["jitter"] = torch.where(on[:, None], factors, torch.ones_like(factors)).float()
        if recipe.randaugment_ops > 0 and recipe.randaugment_prob > 0:
            shape = (n, recipe.randaugment_ops)
            ops = torch.randint(0, len(OPS), shape, generator=generator)
            on = torch.rand(shape, generator=generator) < recipe.randaugment_prob
            spread = torch.randn(shape, generator=generator, dtype=torch.float64) * recipe.randaugment_std
            level = ((recipe.randaugment_magnitude + spread).clamp(0, 10) / 10).float()
            negate = torch.rand(shape, generator=generator) < 0.5
            draws["ra_ops"] = torch.where(on, ops, torch.full_like(ops, -1))
            draws["ra_levels"] = torch.where(negate, -level, level)
        if recipe.erasing > 0:
            draws["erase_boxes"] = _erase_boxes(n, size, recipe.erasing, generator)
            tiles = torch.randint(0, NOISE_TILES, (n, 1), generator=generator)
            offsets = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor(size)).long()
            draws["erase_noise"] = torch.cat([tiles, offsets], dim=1)
        return cls(**draws)

    def slice(self, start: int, stop: int) -> AugmentParams:
        """This rank's samples: rows start..stop of the global batch."""
        rows = {
            f.name: getattr(self, f.name)[start:stop]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **rows)


def _resized_crop_boxes(n: int, stored: tuple[int, int], scale_min: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for n images at once: up to ATTEMPTS tries of an area
    in [scale_min, 1] and a log-uniform aspect in RATIO that fits, else the whole image at the nearest
    aspect in RATIO, centred."""
    height, width = stored
    area = height * width
    scale = scale_min + (1 - scale_min) * torch.rand(n, ATTEMPTS, generator=generator, dtype=torch.float64)
    log_ratio = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * torch.rand(
        n, ATTEMPTS, generator=generator, dtype=torch.float64
    )
    ratio = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * scale * ratio)).long()
    h = torch.round(torch.sqrt(area * scale / ratio)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1)
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    where = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(where[:, 0] * (height - h + 1)).long()
    left = torch.floor(where[:, 1] * (width - w + 1)).long()
    # the fallback: torchvision's centre crop at the nearest allowed aspect
    aspect = width / height
    fw, fh = width, height
    if aspect < RATIO[0]:
        fh = round(width / RATIO[0])
    elif aspect > RATIO[1]:
        fw = round(height * RATIO[1])
    none_fit = ~fits.any(dim=1)
    h, w = torch.where(none_fit, fh, h), torch.where(none_fit, fw, w)
    top = torch.where(none_fit, (height - fh) // 2, top)
    left = torch.where(none_fit, (width - fw) // 2, left)
    return torch.stack([top, left, h, w], dim=1)


def _erase_boxes(n: int, size: tuple[int, int], prob: float, generator: torch.Generator) -> torch.Tensor:
    """timm's RandomErasing boxes for n images: with probability `prob`, up to ATTEMPTS tries of an area
    fraction in ERASE_AREA and a log-uniform aspect in ERASE_RATIO that fits strictly inside."""
    height, width = size
    on = torch.rand(n, generator=generator) < prob
    fraction = torch.rand(n, ATTEMPTS, generator=generator, dtype=torch.float64)
    area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * fraction) * (height * width)
    low, high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(low + (high - low) * torch.rand(n, ATTEMPTS, generator=generator, dtype=torch.float64))
    h = torch.round(torch.sqrt(area * ratio)).long()
    w = torch.round(torch.sqrt(area / ratio)).long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(dim=1)
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    where = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(where[:, 0] * (height - h + 1)).long()
    left = torch.floor(where[:, 1] * (width - w + 1)).long()
    erased = on & fits.any(dim=1)
    zero = torch.zeros_like(h)
    return torch.stack([top, left, torch.where(erased, h, zero), torch.where(erased, w, zero)], dim=1)
