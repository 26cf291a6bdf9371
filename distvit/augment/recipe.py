"""What a run's augmentation is: the augment section's preset with its parts changed, in words. This module
reads the augment section; the rest of distvit gets a `Recipe`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from distvit.config import AugmentConfig


@dataclass(frozen=True)
class Recipe:
    """Every part's setting (resolved: no empty values)."""

    crop: str = "none"
    """none, pad (random crop of the zero-padded image) or resized (random-resized crop)."""
    crop_padding: int = 4
    crop_scale_min: float = 0.08
    hflip: float = 0.0
    color_jitter: float = 0.0
    color_jitter_prob: float = 0.8
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0
    randaugment_std: float = 0.5
    randaugment_prob: float = 0.5
    erasing: float = 0.0
    repeats: int = 1

    @property
    def active(self) -> bool:
        """Whether training images are changed at all (repeats alone change only the epoch's order)."""
        return (
            self.crop != "none"
            or self.hflip > 0
            or (self.color_jitter > 0 and self.color_jitter_prob > 0)
            or (self.randaugment_ops > 0 and self.randaugment_prob > 0)
            or self.erasing > 0
        )

    def describe(self) -> str:
        """The pipeline in words, in the order it runs."""
        parts = []
        if self.crop == "pad" and self.crop_padding:
            parts.append(f"random crop (zero padding {self.crop_padding} px)")
        if self.hflip:
            parts.append(f"horizontal flip p={self.hflip:g}")
        if self.crop == "resized":
            parts.append(f"random-resized crop (area {self.crop_scale_min:g}-1, aspect 3/4-4/3)")
        if self.color_jitter and self.color_jitter_prob:
            parts.append(f"colour jitter {self.color_jitter:g} p={self.color_jitter_prob:g}")
        if self.randaugment_ops and self.randaugment_prob:
            parts.append(
                f"RandAugment {self.randaugment_ops} ops m{self.randaugment_magnitude:g} "
                f"std {self.randaugment_std:g} p={self.randaugment_prob:g}"
            )
        if self.erasing:
            parts.append(f"random erasing p={self.erasing:g}")
        words = " -> ".join(parts) if parts else "none"
        return words + (f"; each sample {self.repeats}x per epoch" if self.repeats > 1 else "")


NONE = Recipe()
PRESETS = {
    "none": NONE,
    "lesson": NONE,  # the lesson trains on the images as they are (resized to the model's size)
    "crop_flip": Recipe(crop="pad", hflip=0.5),
    # DeiT's: timm create_transform(is_training, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25) with
    # repeated augmentation 3; timm turns colour jitter off when RandAugment is on
    "deit": Recipe(crop="resized", hflip=0.5, randaugment_ops=2, erasing=0.25, repeats=3),
}


def recipe_of(cfg: AugmentConfig) -> Recipe:
    """The preset augment.preset names, with augment.crop_padding and every part the section sets."""
    preset = dataclasses.replace(PRESETS[cfg.preset], crop_padding=cfg.crop_padding)
    parts = {f.name for f in dataclasses.fields(Recipe)}
    given = {k: v for k, v in dataclasses.asdict(cfg).items() if k in parts and v is not None}
    return dataclasses.replace(preset, **given)


def recipe_settings(recipe: Recipe) -> dict[str, Any]:
    """The recipe's parts by config key ('augment.hflip': 0.5, ...), repeats aside (they are part of the
    epoch's order): what checkpoints record of the augmentation."""
    settings = dataclasses.asdict(recipe)
    del settings["repeats"]
    return {f"augment.{name}": value for name, value in settings.items()}


def what_augments(cfg: AugmentConfig) -> tuple[str, str] | None:
    """What changes the training images, in the keys that ask for it, and what would leave them as they
    are; None when nothing changes them. The preset when it augments, else the parts the section sets."""
    if PRESETS[cfg.preset].active:
        return f"augment.preset={cfg.preset}", "none"
    recipe = recipe_of(cfg)
    return (f"the augment section's {recipe.describe()}", "no augmentation") if recipe.active else None


def flip_warning(recipe: Recipe, flip_safe: bool, where: str) -> str | None:
    """A warning when the recipe flips images that the dataset's manifest says a flip changes."""
    if recipe.hflip > 0 and not flip_safe:
        return (
            f"warning: {where} is marked not flip-safe (prepared with --no-flip: a flip changes what its images "
            f"mean) but the augmentation flips with p={recipe.hflip:g}; set augment.hflip=0."
        )
    return None
