"""Model surgery: geometry, position-embedding strategies, freezing."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from distvit.config import load_config
from distvit.engine.optim import build_optimizer
from tests.support.models import surgery


@pytest.fixture(scope="module")
def original(weights):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    return model.eval()


def test_identity_surgery_changes_nothing(small_dataset, weights, original):
    model, _ = surgery(small_dataset, weights, "surgery.img_size=224", "surgery.patch_size=16", "surgery.head=keep")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_truncate_is_the_lessons_manual_slice(small_dataset, weights, original):
    model, record = surgery(
        small_dataset, weights, "surgery.img_size=32", "surgery.pos_embed=truncate", "surgery.head=keep"
    )
    lesson = timm.create_model(
        "deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(weights)}
    ).eval()
    lesson.patch_embed.img_size = (32, 32)  # the lesson's two manual steps
    lesson.pos_embed = torch.nn.Parameter(lesson.pos_embed[:, :5])
    assert torch.equal(model.pos_embed, lesson.pos_embed) and record.tokens_per_image == 5
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), lesson(x))


def test_interpolate_uses_timms_resample_from_the_original(small_dataset, weights, original):
    model, record = surgery(small_dataset, weights, "surgery.img_size=112")
    expected = timm.layers.resample_abs_pos_embed(original.pos_embed, new_size=(7, 7), num_prefix_tokens=1)
    assert record.grid_size == (7, 7) and torch.equal(model.pos_embed, expected)


def test_patch_growth_keeps_outputs_on_upsampled_input(small_dataset, weights, original):
    """FlexiViT's exact case: 16 -> 32 px patches at 448 px; each 16 px patch upsampled to 32 px."""
    model, _ = surgery(small_dataset, weights, "surgery.img_size=448", "surgery.patch_size=32", "surgery.head=keep")
    x = torch.randn(1, 3, 224, 224)
    patches = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 16, 16)
    grown = F.interpolate(patches, size=(32, 32), mode="bicubic", antialias=True)
    upsampled = grown.reshape(1, 14, 14, 3, 32, 32).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 448, 448)
    with torch.no_grad():
        assert torch.allclose(model(upsampled), original(x), atol=1e-4, rtol=1e-4)


def test_distilled_native_32_keeps_both_prefix_tokens(small_dataset, tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("deit_tiny_distilled_patch16_224")
    path = tmp_path / "distilled.pth"
    torch.save(source.state_dict(), path)
    model, record = surgery(
        small_dataset,
        path,
        "model.name=deit_tiny_distilled_patch16_224",
        "surgery.img_size=32",
        "surgery.pos_embed=truncate",
        classes=10,
    )
    assert record.num_prefix_tokens == 2 and record.tokens_per_image == 6
    assert torch.equal(model.pos_embed, source.pos_embed[:, :6])
    assert model.head.out_features == model.head_dist.out_features == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # eval: mean of both heads


def test_dynamic_resamples_per_input_size(small_dataset, weights, original):
    model, record = surgery(
        small_dataset, weights, "surgery.img_size=64", "surgery.pos_embed=dynamic", "surgery.head=keep"
    )
    assert model.pos_embed.shape == original.pos_embed.shape and record.grid_size == (4, 4)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)


def test_freeze_backbone_and_blocks(small_dataset, weights):
    model, record = surgery(small_dataset, weights, "surgery.freeze=backbone", classes=10)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["head.bias", "head.weight"]
    assert record.trainable_params == 192 * 10 + 10
    optimizer = build_optimizer(model, load_config(None, [f"data.path={small_dataset}"]).optim)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 1930
    model, _ = surgery(small_dataset, weights, "surgery.freeze=blocks:2", classes=10)
    trainable = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"blocks.10", "blocks.11", "norm", "head"}
    model, _ = surgery(small_dataset, weights, "surgery.freeze_embeddings=true", classes=10)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["cls_token", "patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"]
