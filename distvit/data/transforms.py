"""Batched image transforms on the training device: uint8 at stored size in, normalised floats out.

Images travel as uint8 at their stored size (CIFAR: 3 KB each); augmentation runs on the small uint8
images, then one resize to the model's input size and normalisation, all as batched tensor ops.
Random choices are drawn on the CPU for the whole global batch from a per-step seed, so a step's
augmentation is the same on CPU and GPU, for any world size, and when a run resumes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distvit.data.devices import to_device


@dataclass(frozen=True)
class Augmentation:
    """Per-sample random choices for one global batch; ranks take their slice, so a step's augmentation
    does not depend on how the batch is split over ranks."""

    padding: int
    """Zero padding of the random crop; offsets lie in [0, 2 * padding]."""
    offset_y: torch.Tensor
    offset_x: torch.Tensor
    flip: torch.Tensor

    @classmethod
    def sample(cls, batch_size: int, crop_padding: int, hflip: bool, generator: torch.Generator) -> "Augmentation":
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, batch_size), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        return cls(crop_padding, offsets[0], offsets[1], flip if hflip else torch.zeros_like(flip))

    def slice(self, start: int, stop: int) -> "Augmentation":
        return Augmentation(self.padding, self.offset_y[start:stop], self.offset_x[start:stop], self.flip[start:stop])


def random_crop(images: torch.Tensor, padding: int, offset_y: torch.Tensor, offset_x: torch.Tensor) -> torch.Tensor:
    """Zero-pad N x H x W x C images by `padding` and crop each back to H x W at its offset."""
    if padding == 0:
        return images
    n, height, width, _ = images.shape
    device = images.device
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    rows = to_device(offset_y, device)[:, None] + torch.arange(height, device=device)
    cols = to_device(offset_x, device)[:, None] + torch.arange(width, device=device)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the N x H x W x C images selected by the bool mask `flip` left-right."""
    return torch.where(to_device(flip, images.device)[:, None, None, None], images.flip(2), images)


@dataclass(frozen=True)
class BatchTransform:
    """Turns a uint8 N x H x W x C batch into the model's normalised float N x C x S x S input."""

    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor, augmentation: Augmentation | None = None) -> torch.Tensor:
        if augmentation is not None:
            images = random_crop(images, augmentation.padding, augmentation.offset_y, augmentation.offset_x)
            images = hflip(images, augmentation.flip)
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1 and len(self.mean) == 3:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            shrinking = x.shape[-1] > self.img_size[1] or x.shape[-2] > self.img_size[0]
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False, antialias=shrinking)
        mean, std = _normalisation(self.mean, self.std, x.device)
        return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Mean and std as 1 x C x 1 x 1 tensors on `device`, made once (a tensor built from Python numbers
    on a GPU is a host-to-device copy that synchronises)."""
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))
