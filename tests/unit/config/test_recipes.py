"""Every config in configs/ validates and builds its model as documented (the recipes' real runs need
CIFAR-10 and pretrained weights, which these machines cannot download: pretrained is switched off)."""

from __future__ import annotations

import pytest
import torch

from distvit.config import load_config
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.model.build import build_model
from tests.support.helpers import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXPECTED_GEOMETRY = {  # config -> (img_size, patch_size, tokens, pos_embed, trainable params are head only)
    "demo": (32, 16, 5, "interpolate", False),
    "lesson_head_only_224": (224, 16, 197, "interpolate", True),
    "lesson_full_224": (224, 16, 197, "interpolate", False),
    "lesson_native32_truncate": (32, 16, 5, "truncate", False),
    "distvit_full_224": (224, 16, 197, "interpolate", False),
    "distvit_native32_p4": (32, 4, 65, "interpolate", False),
    "distvit_128": (128, 16, 65, "interpolate", False),
    "deit_finetune_224": (224, 16, 197, "interpolate", False),
    "deit_native32_p4": (32, 4, 65, "interpolate", False),
}


@pytest.fixture(scope="module")
def cifar_shaped(tmp_path_factory):
    """10k training images: the lesson's head-only subset must fit."""
    out = tmp_path_factory.mktemp("data") / "cifar-shaped"
    prepare_synthetic(out, train_size=10_000, test_size=20, samples_per_shard=5000)
    return out


def test_every_config_is_covered():
    assert sorted(p.stem for p in CONFIGS) == sorted(EXPECTED_GEOMETRY)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_builds_as_documented(path, cifar_shaped, tmp_path):
    cfg = load_config(path, [f"data.path={cifar_shaped}", "model.pretrained=false", f"run.dir={tmp_path}/run"])
    img_size, patch_size, tokens, pos_embed, head_only = EXPECTED_GEOMETRY[path.stem]
    torch.manual_seed(0)
    model, record = build_model(cfg.model, cfg.surgery, 10)
    assert (record.img_size, record.patch_size, record.tokens_per_image, record.pos_embed) == (
        img_size,
        patch_size,
        tokens,
        pos_embed,
    )
    assert (record.trainable_params == 1930) == head_only  # 192 x 10 + 10: only the new head trains
    assert cfg.run.dir.endswith("run")
    if path.stem.startswith("lesson_"):  # the lesson's loop: SGD, fp32, no augmentation
        assert (cfg.optim.name, cfg.train.mixed_precision, cfg.augment.preset) == ("sgd", "no", "none")
    if path.stem == "lesson_head_only_224":
        assert (cfg.data.train_subset, cfg.train.epochs) == (10_000, 1)
    if path.stem.startswith("deit_"):  # DeiT's augmentation; at 32 px a padded crop instead of the resized one
        from distvit.augment import recipe_of

        recipe = recipe_of(cfg.augment)
        assert (recipe.randaugment_ops, recipe.erasing, recipe.repeats, recipe.hflip) == (2, 0.25, 3, 0.5)
        assert recipe.crop == ("pad" if img_size == 32 else "resized") and cfg.mix.mixup_alpha == 0.8
    if path.stem.startswith(("distvit_", "deit_")):
        assert cfg.ema.enabled and cfg.train.label_smoothing > 0 and cfg.optim.lr_scale == "linear"
