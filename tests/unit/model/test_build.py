"""distvit.model.build: model building from the config, local pretrained weights, the model checks."""

from __future__ import annotations

import pytest
import timm
import torch
from accelerate.utils import set_seed

from distvit.config import load_config
from distvit.errors import ConfigError, DistvitError
from distvit.model.build import build_model, check_model_config


def build(cfg, num_classes):
    """build_model from a whole Config (its model and surgery sections)."""
    return build_model(cfg.model, cfg.surgery, num_classes)


def config(dataset, *overrides):
    return load_config(None, [f"data.path={dataset}", *overrides])


def test_head_and_geometry_follow_config(small_dataset):
    model, record = build(config(small_dataset, "surgery.img_size=32", "surgery.patch_size=8"), num_classes=10)
    assert model.head.out_features == 10
    assert record.grid_size == (4, 4) and record.tokens_per_image == 17
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # deit_tiny with a 10-class head is 5,489,482 parameters at 32 px / patch 16 (see the demo's log);
    # patch 8 has a 3*8*8*192 instead of 3*16*16*192 kernel and 17 instead of 5 position embeddings.
    assert record.num_params == record.trainable_params == 5_489_482 - 3 * (256 - 64) * 192 + (17 - 5) * 192


def test_distilled_variant_gets_both_heads_replaced(small_dataset):
    model, record = build(config(small_dataset, "model.name=deit_tiny_distilled_patch16_224", "surgery.img_size=32"), 7)
    assert model.head.out_features == 7 and model.head_dist.out_features == 7
    assert record.num_prefix_tokens == 2 and record.tokens_per_image == 6


def test_local_pretrained_file_is_loaded(small_dataset, tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    weights = tmp_path / "deit_tiny_random.pth"
    torch.save(source.state_dict(), weights)
    torch.manual_seed(0)  # a different init: equal tensors below can only come from the file
    model, record = build(config(small_dataset, f"model.pretrained={weights}"), num_classes=10)
    assert record.pretrained == str(weights.resolve())
    expected = source.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("head."):
            assert tensor.shape[0] == 10  # new head for the dataset's classes
        else:
            assert torch.equal(tensor, expected[name]), name


def test_local_pretrained_file_resampled_to_new_size(small_dataset, tmp_path):
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    weights = tmp_path / "w.pth"
    torch.save(source.state_dict(), weights)
    model, _ = build(config(small_dataset, f"model.pretrained={weights}", "surgery.img_size=64"), 10)
    expected = timm.layers.resample_abs_pos_embed(source.pos_embed, new_size=(4, 4), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)


def test_weights_file_of_other_architecture_is_a_clear_error(small_dataset, tmp_path):
    weights = tmp_path / "small.pth"
    torch.save(timm.create_model("deit_small_patch16_224").state_dict(), weights)
    with pytest.raises(DistvitError, match="cannot load it into deit_tiny_patch16_224"):
        build(config(small_dataset, f"model.pretrained={weights}"), 10)


def test_model_checks_name_kind_and_geometry(small_dataset):
    cfg = config(small_dataset, "model.name=deit_tiny_patch16_244")
    with pytest.raises(ConfigError, match="is not a timm model. Did you mean: deit_tiny_patch16_224"):
        check_model_config(cfg.model, cfg.surgery, 10)
    cfg = config(small_dataset, "model.name=resnet18")
    with pytest.raises(ConfigError, match="is a ResNet; distvit supports timm VisionTransformer"):
        check_model_config(cfg.model, cfg.surgery, 10)
    cfg = config(small_dataset, "surgery.img_size=40")
    with pytest.raises(ConfigError, match=r"\(40\) is not divisible by the patch size 16"):
        check_model_config(cfg.model, cfg.surgery, 10)
    cfg = config(small_dataset, "surgery.head=keep")
    with pytest.raises(ConfigError, match="1000-class head, but the dataset has 10 classes"):
        check_model_config(cfg.model, cfg.surgery, 10)


def test_weights_file_with_other_key_names_is_refused(small_dataset, tmp_path):
    """timm loads non-strictly when the head is replaced: a file with other names must not leave the model random."""
    state = timm.create_model("deit_tiny_patch16_224").state_dict()
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"backbone.{k}": v for k, v in state.items()}, prefixed)
    with pytest.raises(DistvitError, match=r"the file lacks 150 of the model's 152 tensors, e.g. cls_token"):
        build(config(small_dataset, f"model.pretrained={prefixed}"), 10)
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    with pytest.raises(DistvitError, match="cannot load it into deit_tiny_patch16_224"):
        build(config(small_dataset, f"model.pretrained={junk}"), 10)


def test_weights_nested_under_model_key_are_loaded(small_dataset, tmp_path):
    source = timm.create_model("deit_tiny_patch16_224")
    nested = tmp_path / "nested.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, nested)  # e.g. a distvit or DeiT checkpoint
    model, _ = build(config(small_dataset, f"model.pretrained={nested}"), 10)
    assert torch.equal(model.blocks[5].mlp.fc1.weight, source.blocks[5].mlp.fc1.weight)


def test_random_init_at_a_new_geometry_is_timms_own(small_dataset):
    """No pretrained weights: timm creates the model at the target geometry (its init for a patch-8 kernel
    and a 17-token pos_embed), instead of a 224/16 model whose random weights are then resampled."""
    cfg = config(small_dataset, "model.pretrained=false", "surgery.img_size=32", "surgery.patch_size=8")
    set_seed(0)
    model, record = build_model(cfg.model, cfg.surgery, 10)
    set_seed(0)
    reference = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, drop_path_rate=0.0
    )
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert record.grid_size == (4, 4) and record.pretrained == "none"
    kernel = model.patch_embed.proj.weight
    assert kernel.shape == (192, 3, 8, 8)
    # torch's default conv init: std 1 / sqrt(3 x fan_in) = 1 / 24 for 3 x 8 x 8 inputs; a patch-16 kernel
    # resampled to 8 px would have std ~0.053 (and its 224/16 init 1 / 48)
    assert kernel.std().item() == pytest.approx(reference.patch_embed.proj.weight.std().item(), rel=1e-6)
    assert kernel.std().item() == pytest.approx(1 / 24, rel=0.05)
