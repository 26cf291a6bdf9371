"""distvit.model.record: the surgery record's dict form and its refusals, tokens and architecture, the FLOP
count of the transformer, and the fingerprint ranks compare."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from distvit.config import SurgeryConfig
from distvit.errors import CheckpointError
from distvit.model.record import RECORD_VERSION, SurgeryRecord, fingerprint, make_record, transformer_flops


@functools.lru_cache(maxsize=None)
def _model(name: str = "deit_tiny_patch16_224", patch_size: int = 16) -> torch.nn.Module:
    """Built once per module (tests that change one restore it)."""
    torch.manual_seed(0)
    return timm.create_model(name, img_size=32, patch_size=patch_size, num_classes=10).eval()


@pytest.fixture(scope="module")
def record() -> SurgeryRecord:
    return make_record(_model(), "deit_tiny_patch16_224", SurgeryConfig(img_size=32, freeze="backbone"), "none")


def test_dict_round_trip_through_json(record):
    raw = json.loads(json.dumps(record.to_dict()))  # as a checkpoint stores it: tuples become lists
    assert raw["version"] == RECORD_VERSION == 2 and raw["grid_size"] == [2, 2]
    again = SurgeryRecord.from_dict(raw)
    assert again == record
    assert again.grid_size == (2, 2) and isinstance(again.mean, tuple) and isinstance(again.std, tuple)


def test_another_version_or_unknown_keys_are_refused(record):
    older = {**record.to_dict(), "version": 1}
    with pytest.raises(CheckpointError) as caught:
        SurgeryRecord.from_dict(older)
    assert str(caught.value) == (
        "surgery record version 1 with keys [] was written by another distvit version; this one reads version 2."
    )
    with pytest.raises(CheckpointError, match=r"version 2 with keys \['layer_scale', 'zz'\] was written by another"):
        SurgeryRecord.from_dict({**record.to_dict(), "zz": 1, "layer_scale": True})
    unversioned = record.to_dict()
    del unversioned["version"]
    with pytest.raises(CheckpointError, match="surgery record version None"):
        SurgeryRecord.from_dict(unversioned)


def test_tokens_per_image_counts_patches_and_prefix_tokens(record):
    assert (record.grid_size, record.num_prefix_tokens, record.tokens_per_image) == ((2, 2), 1, 5)
    assert dataclasses.replace(record, grid_size=(3, 5), num_prefix_tokens=2).tokens_per_image == 17


def test_architecture_holds_what_a_checkpoint_must_agree_on(record):
    assert record.architecture() == {
        "model_name": "deit_tiny_patch16_224",
        "num_classes": 10,
        "img_size": 32,
        "patch_size": 16,
        "pos_embed": "interpolate",
        "freeze": "backbone",
        "freeze_embeddings": False,
    }
    # how training goes or where the weights came from does not change the architecture
    other = dataclasses.replace(record, drop_path=0.1, lr_decay=0.75, pretrained="hub", head="keep")
    assert other.architecture() == record.architecture()
    assert dataclasses.replace(record, patch_size=8).architecture() != record.architecture()
    assert set(record.plan()) - set(record.architecture()) == {"head", "drop_path", "lr_decay", "pretrained"}


def _deit_tiny_flops(tokens: int, patches: int, patch: int, heads: int = 1) -> int:
    """The formula with DeiT-Ti's sizes: 12 blocks of width 192, MLP 768, 10 classes (2 x multiply-adds)."""
    dim, hidden = 192, 768
    per_block = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * hidden
    return 2 * (12 * per_block + patches * 3 * patch * patch * dim + heads * dim * 10)


@pytest.mark.parametrize(
    "name, patch, prefix, heads",
    [
        ("deit_tiny_patch16_224", 8, 1, 1),
        ("deit_tiny_patch16_224", 4, 1, 1),
        ("deit_tiny_distilled_patch16_224", 8, 2, 2),
    ],
)
def test_transformer_flops_follow_the_token_count_and_match_a_flop_counter(name, patch, prefix, heads):
    model = _model(name, patch)
    grid = 32 // patch
    flops = transformer_flops(model, (grid, grid))
    assert flops == _deit_tiny_flops(grid * grid + prefix, grid * grid, patch, heads)
    fused = [block.attn.fused_attn for block in model.blocks]
    for block in model.blocks:
        block.attn.fused_attn = False  # the counter sees the attention matmuls only when they are explicit
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
    finally:
        for block, was in zip(model.blocks, fused):
            block.attn.fused_attn = was
    assert counter.get_total_flops() == flops


def test_flops_grow_with_tokens_as_the_formula_says():
    p4 = transformer_flops(_model(patch_size=4), (8, 8))  # 65 tokens
    p8 = transformer_flops(_model(patch_size=8), (4, 4))  # 17 tokens
    # the token-linear part grows 65/17 times, attention's token-quadratic part (65/17)^2 times
    quadratic = 2 * 12 * 2 * 192 * (65**2 - 17**2)
    linear = 2 * 12 * (4 * 192 * 192 + 2 * 192 * 768) * (65 - 17)
    assert p4 - p8 == quadratic + linear  # patch embedding and head cost the same: 64 x 48 = 16 x 192 inputs
    assert 65 / 17 < p4 / p8 < (65 / 17) ** 2


def test_fingerprint_sees_every_weight_bit_and_what_trains():
    model = _model()
    plan = {"model_name": "deit_tiny_patch16_224", "img_size": 32}
    base = fingerprint(model, plan)
    assert fingerprint(copy.deepcopy(model), dict(plan)) == base  # equal models agree (as ranks must)
    assert len(base) == 64 and int(base, 16) >= 0
    assert fingerprint(model, {**plan, "img_size": 64}) != base
    weight = model.blocks[5].mlp.fc1.weight
    with torch.no_grad():
        weight[3, 7] += 1e-6
        nudged = fingerprint(model, plan)
        weight[3, 7] -= 1e-6
    assert nudged != base
    model.cls_token.requires_grad_(False)
    frozen = fingerprint(model, plan)
    model.cls_token.requires_grad_(True)
    assert frozen != base
    model.register_buffer("extra", torch.zeros(1))
    buffered = fingerprint(model, plan)
    del model.extra
    assert buffered != base
    assert fingerprint(model, plan) == base  # restored: nothing else differed
