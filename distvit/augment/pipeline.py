"""The training input of a step: a recipe's parts applied to a uint8 batch, then the model's resize and
normalisation (distvit.augment.transforms.BatchTransform)."""

from __future__ import annotations

import functools

import torch

from distvit.augment.ops import color_jitter, hflip, random_crop, random_erase, resized_crop
from distvit.augment.params import AugmentParams
from distvit.augment.randaugment import rand_augment
from distvit.augment.recipe import Recipe
from distvit.augment.transforms import BatchTransform


class Augmenter:
    """uint8 N x H x W x C at stored size -> the model's normalised float N x C x S x S input, augmented."""

    def __init__(self, recipe: Recipe, transform: BatchTransform):
        self.recipe, self.transform = recipe, transform

    def sample(self, global_batch: int, stored: tuple[int, int], generator: torch.Generator) -> AugmentParams:
        """The choices for one global batch (every rank draws the same, then takes its slice)."""
        return AugmentParams.sample(self.recipe, global_batch, stored, tuple(self.transform.img_size), generator)

    def __call__(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        recipe, transform = self.recipe, self.transform
        if params.crop_offsets is not None:
            images = random_crop(images, recipe.crop_padding, params.crop_offsets)
        if params.flip is not None:
            images = hflip(images, params.flip)
        x = transform.to_float(images)
        if params.crop_boxes is not None:
            x = resized_crop(x, params.crop_boxes, tuple(transform.img_size))
        else:
            x = transform.resize(x)
        if params.jitter is not None:
            x = color_jitter(x, params.jitter)
        if params.ra_ops is not None:
            x = rand_augment(x, params.ra_ops, params.ra_levels, _fill(transform.mean, x.device))
        x = transform.normalize(x)
        if params.erase_boxes is not None:
            x = random_erase(x, params.erase_boxes, params.erase_noise)
        return x


@functools.lru_cache(maxsize=8)
def _fill(mean: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """What geometric operations bring in at the borders: the normalisation's mean colour (timm's fill)."""
    return torch.tensor(mean, device=device)
