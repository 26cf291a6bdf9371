"""Model surgery: geometry, position-embedding strategies, freezing, fingerprints across ranks."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from distvit.config import load_config
from distvit.engine.optim import build_optimizer
from distvit.model.build import build_model
from distvit.model.report import plan_report
from helpers import REPO, accelerate_launch


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 'pretrained' file saved from a randomly initialised model (no downloads)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("w") / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def original(weights):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    return model.eval()


def surgery(small_dataset, weights, *overrides, classes=1000):
    cfg = load_config(None, [f"data.path={small_dataset}", f"model.pretrained={weights}", *overrides])
    model, record = build_model(cfg.model, cfg.surgery, classes)
    return model.eval(), record


def test_identity_surgery_changes_nothing(small_dataset, weights, original):
    model, _ = surgery(small_dataset, weights, "surgery.img_size=224", "surgery.patch_size=16", "surgery.head=keep")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_truncate_is_the_lessons_manual_slice(small_dataset, weights, original):
    model, record = surgery(small_dataset, weights, "surgery.img_size=32", "surgery.pos_embed=truncate", "surgery.head=keep")
    lesson = timm.create_model("deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(weights)}).eval()
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
    model, record = surgery(small_dataset, path, "model.name=deit_tiny_distilled_patch16_224", "surgery.img_size=32",
                            "surgery.pos_embed=truncate", classes=10)
    assert record.num_prefix_tokens == 2 and record.tokens_per_image == 6
    assert torch.equal(model.pos_embed, source.pos_embed[:, :6])
    assert model.head.out_features == model.head_dist.out_features == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # eval: mean of both heads


def test_dynamic_resamples_per_input_size(small_dataset, weights, original):
    model, record = surgery(small_dataset, weights, "surgery.img_size=64", "surgery.pos_embed=dynamic", "surgery.head=keep")
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
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.10", "blocks.11", "norm", "head"}
    model, _ = surgery(small_dataset, weights, "surgery.freeze_embeddings=true", classes=10)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["cls_token", "patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"]


def test_plan_report_counts_and_warns(small_dataset, weights):
    model, record = surgery(small_dataset, weights, "surgery.img_size=32", classes=10)
    report = plan_report(model, record, 64)
    assert "grid 2x2, 5 tokens per image" in report and "5,489,482 total" in report
    assert "surgery.patch_size=4 (grid 8x8)" in report
    model, record = surgery(small_dataset, weights, classes=10)
    assert abs(record.flops_per_image / 1e9 - 2.51) < 0.01  # DeiT-Ti at 224: 1.25 GMACs


def test_fingerprint_check_catches_a_perturbed_rank(small_dataset):
    result = accelerate_launch(2, [str(small_dataset)], script=REPO / "tests" / "scripts" / "perturbed_rank.py", timeout=300)
    assert result.returncode != 0
    assert "rank(s) [1] disagree with rank 0" in result.stdout
    assert "rank 0: the model after surgery differs between ranks" in result.stdout  # rank 0 stops too


def test_layer_wise_lr_decay_groups(small_dataset, weights):
    model, _ = surgery(small_dataset, weights, classes=10)
    optim_cfg = load_config(None, [f"data.path={small_dataset}", "optim.lr=1e-3"]).optim
    optimizer = build_optimizer(model, optim_cfg, lr_decay=0.5)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.blocks[11].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(model.blocks[0].attn.qkv.weight)] == pytest.approx(1e-3 * 0.5**12)
    assert lr_of[id(model.pos_embed)] == pytest.approx(1e-3 * 0.5**13)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model.blocks[3].norm1.weight)] == 0 and decay_of[id(model.pos_embed)] == 0
    assert decay_of[id(model.blocks[3].mlp.fc2.weight)] == optim_cfg.weight_decay
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    same = build_optimizer(model, optim_cfg)  # no decay: two groups, one lr
    assert len(same.param_groups) == 2 and {g["lr"] for g in same.param_groups} == {1e-3}


def test_shrinking_pretrained_patches_warns(small_dataset, weights):
    model, record = surgery(small_dataset, weights, "surgery.img_size=32", "surgery.patch_size=4", classes=10)
    assert "shrinking pretrained patches 16 -> 4 px" in plan_report(model, record, 64)
