"""Recipes: presets, the augment section's changes, the pipeline in words, the flip warning; the random-
resized crop's boxes."""

from __future__ import annotations

import torch

from distvit.augment import PRESETS, AugmentParams, recipe_of
from distvit.augment.recipe import flip_warning
from distvit.config import load_config


def _recipe(*overrides: str):
    cfg = load_config("configs/demo.yaml", list(overrides), check_data=False)
    return recipe_of(cfg.augment)


def test_presets_and_changes():
    assert _recipe() == PRESETS["crop_flip"]  # the default: what distvit always did
    assert _recipe().describe() == "random crop (zero padding 4 px) -> horizontal flip p=0.5"
    assert not _recipe("augment.preset=none").active and not _recipe("augment.preset=lesson").active
    assert _recipe("augment.preset=none").describe() == "none"
    deit = _recipe("augment.preset=deit")
    assert deit.describe() == (
        "horizontal flip p=0.5 -> random-resized crop (area 0.08-1, aspect 3/4-4/3) -> RandAugment 2 ops m9 "
        "std 0.5 p=0.5 -> random erasing p=0.25; each sample 3x per epoch"
    )
    no_flip = _recipe("augment.preset=deit", "augment.hflip=0", "augment.color_jitter=0.3", "augment.crop_padding=2")
    assert no_flip.hflip == 0 and no_flip.color_jitter == 0.3 and no_flip.randaugment_ops == 2
    assert "flip" not in no_flip.describe() and "colour jitter 0.3 p=0.8" in no_flip.describe()
    padded = _recipe("augment.preset=none", "augment.crop=pad", "augment.crop_padding=2")
    assert padded.describe() == "random crop (zero padding 2 px)" and padded.active
    assert not _recipe("augment.preset=none", "augment.repeats=2").active  # repeats change only the order


def test_flipping_data_marked_not_flip_safe_is_a_warning():
    assert flip_warning(PRESETS["crop_flip"], True, "data/x") is None
    assert flip_warning(_recipe("augment.hflip=0"), False, "data/x") is None
    assert flip_warning(PRESETS["crop_flip"], False, "data/digits") == (
        "warning: data/digits is marked not flip-safe (prepared with --no-flip: a flip changes what its images "
        "mean) but the augmentation flips with p=0.5; set augment.hflip=0."
    )


def test_resized_crop_boxes_lie_inside_with_the_configured_area_and_aspect():
    recipe = _recipe("augment.preset=deit")
    params = AugmentParams.sample(recipe, 5000, (48, 64), (32, 32), torch.Generator().manual_seed(0))
    top, left, h, w = params.crop_boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    area, aspect = (h * w).double() / (48 * 64), w.double() / h.double()
    assert float(area.min()) > 0.07 and float(area.max()) <= 1.0  # 0.08 .. 1, up to rounding
    assert float(aspect.min()) > 0.7 and float(aspect.max()) < 1.4  # 3/4 .. 4/3, up to rounding
    assert float(area.mean()) > 0.4  # uniform area over 0.08..1 (large ones fit less often)
    # nothing fits a 4 x 64 strip at area >= 0.9: torchvision's fallback, the centre at aspect 4/3
    strip = AugmentParams.sample(
        _recipe("augment.preset=deit", "augment.crop_scale_min=0.9"), 3, (4, 64), (4, 4), torch.Generator()
    )
    assert strip.crop_boxes.tolist() == [[0, 29, 4, 5]] * 3
