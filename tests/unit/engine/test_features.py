"""distvit.engine.features: cache_blockers names everything that keeps a run's head from training on cached
backbone features, and nothing for a head-only run."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from distvit.config import load_config
from distvit.engine.features import cache_blockers
from distvit.engine.mixing import mixing_enabled
from distvit.model.build import build_model

HEAD_ONLY = ["surgery.img_size=32", "surgery.freeze=backbone", "augment.preset=none"]


@functools.lru_cache(maxsize=None)
def _built(dataset, name: str, freeze: str, drop_path: float):
    """Built once per (model, freeze, drop-path): the other blockers depend on the config alone."""
    overrides = [f"model.name={name}", f"surgery.freeze={freeze}", f"surgery.drop_path={drop_path}"]
    cfg = load_config(None, [f"data.path={dataset}", *HEAD_ONLY, *overrides])
    return build_model(cfg.model, cfg.surgery, 10)


def _blockers(dataset, *overrides: str, unfreeze: str = "") -> list[str]:
    """What cache_blockers says for a config (a distill.type stands for its loaded teacher)."""
    cfg = load_config(None, [f"data.path={dataset}", *HEAD_ONLY, *overrides])
    model, record = _built(dataset, cfg.model.name, cfg.surgery.freeze, cfg.surgery.drop_path)
    teacher = SimpleNamespace(kind=cfg.distill.type) if cfg.distill.type != "none" else None
    blockers = lambda: cache_blockers(model, record, cfg.augment, mixing_enabled(cfg.mix), teacher)  # noqa: E731
    if not unfreeze:
        return blockers()
    parameter = model.get_parameter(unfreeze)
    parameter.requires_grad_(True)
    try:
        return blockers()
    finally:
        parameter.requires_grad_(False)


def test_a_head_only_run_has_no_blocker(small_dataset):
    assert _blockers(small_dataset) == []


def test_each_blocker_is_named(small_dataset):
    assert _blockers(small_dataset, "augment.preset=crop_flip") == ["augment.preset=crop_flip (needs none)"]
    assert _blockers(small_dataset, "mix.mixup_alpha=0.2") == ["mixup/cutmix is on"]
    assert _blockers(small_dataset, "mix.cutmix_alpha=1.0") == ["mixup/cutmix is on"]
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
        "augment.preset=crop_flip",
        "mix.mixup_alpha=0.2",
        "surgery.drop_path=0.1",
        "distill.type=soft",
        "distill.teacher=deit_tiny_patch16_224",
    ) == [
        "augment.preset=crop_flip (needs none)",
        "mixup/cutmix is on",
        "surgery.drop_path=0.1 (the frozen backbone would be random)",
        "distill.type=soft",
    ]


def test_a_distilled_model_has_two_heads(small_dataset):
    assert _blockers(small_dataset, "model.name=deit_tiny_distilled_patch16_224") == [
        "deit_tiny_distilled_patch16_224 has no single linear classifier (a distilled DeiT has two heads)"
    ]
    assert _blockers(small_dataset, "model.name=deit_tiny_distilled_patch16_224", "augment.preset=crop_flip") == [
        "augment.preset=crop_flip (needs none)",
        "deit_tiny_distilled_patch16_224 has no single linear classifier (a distilled DeiT has two heads)",
    ]


def test_cached_features_from_ring_backed_batches_equal_those_from_memory(small_dataset):
    """Nothing compute_features keeps points into a batch (on a CPU with loader workers, a ring slot that a
    later batch refills): the features equal those computed from the split held in memory."""
    from accelerate import Accelerator

    from distvit.augment.transforms import BatchTransform
    from distvit.data.manifest import read_manifest
    from distvit.data.plan import sequential_order
    from distvit.data.read.loader import MemoryBatches, StreamBatches
    from distvit.data.read.memory import load_split
    from distvit.engine.features import compute_features

    class Pooled(torch.nn.Module):
        def forward_features(self, x):
            return x.mean(dim=(2, 3))

        def forward_head(self, x, pre_logits=False):
            return x

    manifest = read_manifest(small_dataset)
    memory = MemoryBatches(load_split(small_dataset, manifest, "train"))
    stream = StreamBatches(small_dataset, manifest, "train", 2, torch.device("cpu"))
    transform = BatchTransform((32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    indices = sequential_order(200)
    expected = compute_features(Pooled(), memory, indices, transform, 8, Accelerator(cpu=True))
    got = compute_features(Pooled(), stream, indices, transform, 8, Accelerator(cpu=True))
    assert stream.ring is not None and stream.ring.slots < 25  # 25 batches: every slot refilled
    assert torch.equal(got.images, expected.images)
    assert torch.equal(got.labels, expected.labels)
