"""The model's input on the training device: uint8 at stored size in, normalised floats at its size out.

Images travel as uint8 at their stored size (CIFAR: 3 KB each) and become the model's input here, as
batched tensor ops: to float, one resize, normalisation. Training augmentation (distvit.augment) runs
between these steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BatchTransform:
    """Turns a uint8 N x H x W x C batch into the model's normalised float N x C x S x S input."""

    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Without augmentation (evaluation, prediction, cached features; training: distvit.augment)."""
        return self.normalize(self.resize(self.to_float(images)))

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C -> float N x C x H x W in [0, 1], grey repeated to the model's channels."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1 and len(self.mean) == 3:
            x = x.expand(-1, 3, -1, -1)
        return x

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """To the model's input size: bilinear, antialiased when shrinking."""
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            shrinking = x.shape[-1] > self.img_size[1] or x.shape[-2] > self.img_size[0]
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False, antialias=shrinking)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = _normalisation(self.mean, self.std, x.device)
        return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Mean and std as 1 x C x 1 x 1 tensors on `device`, made once (a tensor built from Python numbers
    on a GPU is a host-to-device copy that synchronises)."""
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))
