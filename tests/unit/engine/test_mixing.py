"""distvit.engine.mixing: mixup and cutmix decisions, mixed images and targets."""

from __future__ import annotations

import pytest
import torch

from distvit.config import MixConfig
from distvit.engine.mixing import apply_mix, mixed_targets, sample_mix


def test_mixup_targets_and_images_mix_with_the_mirror():
    cfg = MixConfig(mixup_alpha=0.8)
    decision = sample_mix(cfg, [123, 1], 8, 8)
    assert decision.kind == "mixup" and 0 < decision.lam < 1
    assert sample_mix(cfg, [123, 1], 8, 8) == decision  # same seed, same decision (every rank, resume)
    x = torch.randn(4, 3, 8, 8)
    mixed = apply_mix(x, decision)
    torch.testing.assert_close(mixed[0], decision.lam * x[0] + (1 - decision.lam) * x[3])
    labels = torch.tensor([0, 1, 2, 3])
    targets = mixed_targets(labels, 5, 0.1, decision)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets[0, 0] == pytest.approx(decision.lam * 0.92 + (1 - decision.lam) * 0.02)
    assert targets[0, 3] == pytest.approx(decision.lam * 0.02 + (1 - decision.lam) * 0.92)


def test_cutmix_box_and_label_share_agree():
    cfg = MixConfig(cutmix_alpha=1.0)
    decisions = [sample_mix(cfg, [seed, 1], 32, 32) for seed in range(20)]
    assert {d.kind for d in decisions} == {"cutmix"}
    d = next(d for d in decisions if 0.1 < d.lam < 0.9)
    top, bottom, left, right = d.box
    x = torch.arange(2 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    mixed = apply_mix(x, d)
    from_mirror = (mixed[0] != x[0]).float().mean().item()
    assert from_mirror == pytest.approx(1 - d.lam)  # lam is the share of own pixels, box clipping included
    assert torch.equal(mixed[0, :, top:bottom, left:right], x[1, :, top:bottom, left:right])


def test_mix_prob_zero_and_switch():
    assert sample_mix(MixConfig(mixup_alpha=1.0, prob=0.0), [1, 1], 8, 8).kind == "none"
    both = MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = [sample_mix(both, [s, 1], 8, 8).kind for s in range(200)]
    assert 60 < kinds.count("cutmix") < 140 and kinds.count("none") == 0
