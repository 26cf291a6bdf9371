"""distvit.engine.features: cache_blockers names everything that keeps a run's head from training on cached
backbone features, and nothing for a head-only run."""

from __future__ import annotations

import functools

import torch

from distvit.config import load_config
from distvit.engine.features import cache_blockers
from distvit.model.build import build_model

HEAD_ONLY = ["surgery.img_size=32", "surgery.freeze=backbone", "data.augment=none"]


@functools.lru_cache(maxsize=None)
def _model(dataset, name: str, freeze: str) -> torch.nn.Module:
    """Built once per (model, freeze): the other blockers depend on the config alone."""
    cfg = load_config(None, [f"data.path={dataset}", *HEAD_ONLY, f"model.name={name}", f"surgery.freeze={freeze}"])
    return build_model(cfg.model, cfg.surgery, 10)[0]


def _blockers(dataset, *overrides: str, unfreeze: str = "") -> list[str]:
    cfg = load_config(None, [f"data.path={dataset}", *HEAD_ONLY, *overrides])
    model = _model(dataset, cfg.model.name, cfg.surgery.freeze)
    if not unfreeze:
        return cache_blockers(cfg, model)
    parameter = model.get_parameter(unfreeze)
    parameter.requires_grad_(True)
    try:
        return cache_blockers(cfg, model)
    finally:
        parameter.requires_grad_(False)


def test_a_head_only_run_has_no_blocker(small_dataset):
    assert _blockers(small_dataset) == []


def test_each_blocker_is_named(small_dataset):
    assert _blockers(small_dataset, "data.augment=crop_flip") == ["data.augment=crop_flip (needs none)"]
    assert _blockers(small_dataset, "data.mixup_alpha=0.2") == ["mixup/cutmix is on"]
    assert _blockers(small_dataset, "data.cutmix_alpha=1.0") == ["mixup/cutmix is on"]
    assert _blockers(small_dataset, "surgery.drop_path=0.1") == [
        "surgery.drop_path=0.1 (the frozen backbone would be random)"
    ]
    assert _blockers(small_dataset, "distill.type=hard", "distill.teacher=deit_tiny_patch16_224") == [
        "distill.type=hard"
    ]
    assert _blockers(small_dataset, unfreeze="blocks.11.mlp.fc2.weight") == ["parameters outside the classifier train"]


def test_a_freeze_other_than_backbone_blocks_and_leaves_the_backbone_trainable(small_dataset):
    assert _blockers(small_dataset, "surgery.freeze=none") == [
        "surgery.freeze=none (needs backbone)",
        "parameters outside the classifier train",
    ]
    assert _blockers(small_dataset, "surgery.freeze=blocks:2") == [
        "surgery.freeze=blocks:2 (needs backbone)",
        "parameters outside the classifier train",
    ]


def test_several_blockers_are_listed_together(small_dataset):
    assert _blockers(
        small_dataset,
        "data.augment=crop_flip",
        "data.mixup_alpha=0.2",
        "surgery.drop_path=0.1",
        "distill.type=soft",
        "distill.teacher=deit_tiny_patch16_224",
    ) == [
        "data.augment=crop_flip (needs none)",
        "mixup/cutmix is on",
        "surgery.drop_path=0.1 (the frozen backbone would be random)",
        "distill.type=soft",
    ]


def test_a_distilled_model_has_two_heads(small_dataset):
    assert _blockers(small_dataset, "model.name=deit_tiny_distilled_patch16_224") == [
        "deit_tiny_distilled_patch16_224 has no single linear classifier (a distilled DeiT has two heads)"
    ]
    assert _blockers(small_dataset, "model.name=deit_tiny_distilled_patch16_224", "data.augment=crop_flip") == [
        "data.augment=crop_flip (needs none)",
        "deit_tiny_distilled_patch16_224 has no single linear classifier (a distilled DeiT has two heads)",
    ]
