"""distvit.engine.optim: lr schedules, lr scaling with the global batch, parameter groups, AdamW/SGD."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from distvit.config import OptimConfig, load_config
from distvit.engine.optim import build_optimizer, build_scheduler, lr_factor, lr_multiplier
from tests.support.models import surgery


def test_step_schedule_warmup_and_lr_scaling():
    assert [lr_factor(s, 100, 10, "step", 0.0, (40, 70), 0.1) for s in (0, 9, 10, 39, 40, 69, 70, 99)] == pytest.approx(
        [0.1, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )
    cfg = OptimConfig(lr=1e-3, lr_scale="linear", lr_base_batch=512)
    assert lr_multiplier(cfg, 1024) == 2.0
    assert lr_multiplier(OptimConfig(lr_scale="sqrt", lr_base_batch=256), 1024) == 2.0
    assert lr_multiplier(OptimConfig(), 1024) == 1.0
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg, global_batch=1024)
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(2e-3)
    step_cfg = OptimConfig(lr=1.0, schedule="step", step_epochs=[1.0], step_gamma=0.5)
    scheduler = build_scheduler(torch.optim.SGD(model.parameters(), lr=1.0), step_cfg, steps_per_epoch=4, epochs=2)
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs == [1.0] * 4 + [0.5] * 4


def test_fused_adamw_choice():
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, OptimConfig(fused=True)).defaults["fused"] is True  # CPU kernel in torch >= 2.4
    assert build_optimizer(model, OptimConfig()).defaults["fused"] is True  # auto: wherever torch has the kernel
    assert not build_optimizer(model, OptimConfig(fused=False)).defaults["fused"]


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


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)


def test_lr_factor_warmup_then_cosine_end_points():
    assert [lr_factor(s, 110, 10, "cosine", 0.1) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, 110, 10, "cosine", 0.1) == pytest.approx(1.0)  # the peak right after warmup
    assert lr_factor(35, 110, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))  # a quarter
    assert lr_factor(60, 110, 10, "cosine", 0.1) == pytest.approx(0.55)  # half way: between peak and floor
    assert lr_factor(110, 110, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 110, 10, "cosine", 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_factor(0, 100, 0, "cosine", 0.0) == 1.0  # no warmup: starts at the peak


def test_lr_factor_step_milestones_and_constant():
    factors = [lr_factor(s, 100, 0, "step", 0.0, (30, 60), 0.5) for s in (0, 29, 30, 59, 60, 99, 200)]
    assert factors == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25])
    assert lr_factor(75, 100, 0, "step", 0.0, (), 0.5) == 1.0  # no milestones: the peak throughout
    constant = [lr_factor(s, 100, 4, "constant", 0.3) for s in (0, 3, 4, 99, 500)]
    assert constant == pytest.approx([0.25, 1.0, 1.0, 1.0, 1.0])  # warmup, then the peak; min_factor unused


@pytest.mark.parametrize(
    "overrides, warmup, milestones",
    [
        ({"schedule": "cosine", "min_lr": 0.01, "warmup_epochs": 0.5}, 2, ()),
        ({"schedule": "step", "step_epochs": [0.5, 2.0], "step_gamma": 0.1}, 0, (2, 8)),
        ({"schedule": "constant", "warmup_epochs": 1.0}, 4, ()),
    ],
)
def test_scheduler_follows_lr_factor_step_by_step(overrides, warmup, milestones):
    cfg = OptimConfig(lr=0.1, **overrides)
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=4, epochs=3)
    used = []
    for _ in range(12):
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    min_factor = cfg.min_lr / cfg.lr
    expected = [0.1 * lr_factor(s, 12, warmup, cfg.schedule, min_factor, milestones, cfg.step_gamma) for s in range(12)]
    assert [lrs[0] for lrs in used] == pytest.approx(expected)
    assert all(len(lrs) == 2 and lrs[0] == lrs[1] for lrs in used)  # every group follows the schedule
    assert len(set(expected)) > 1  # the lr does change over these steps


def test_lr_multiplier_and_the_scaled_optimizer():
    assert lr_multiplier(OptimConfig(lr_scale="none"), 4096) == 1.0
    assert lr_multiplier(OptimConfig(lr_scale="linear", lr_base_batch=512), 256) == 0.5
    assert lr_multiplier(OptimConfig(lr_scale="sqrt", lr_base_batch=512), 128) == 0.5
    assert lr_multiplier(OptimConfig(lr_scale="sqrt", lr_base_batch=100), 200) == pytest.approx(math.sqrt(2))
    cfg = OptimConfig(lr=1e-3, lr_scale="linear", lr_base_batch=512)
    model = torch.nn.Linear(4, 4)
    assert [g["lr"] for g in build_optimizer(model, cfg, global_batch=256).param_groups] == pytest.approx([5e-4, 5e-4])
    assert [g["lr"] for g in build_optimizer(model, cfg).param_groups] == pytest.approx([1e-3, 1e-3])  # batch unknown


def test_no_weight_decay_on_biases_norms_position_embedding_and_class_token(vit):
    optimizer = build_optimizer(vit, OptimConfig(weight_decay=0.05))
    name_of = {id(p): n for n, p in vit.named_parameters()}
    decay_of = {name_of[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(decay_of) == len(name_of)  # each once
    undecayed = {n for n, d in decay_of.items() if d == 0.0}
    assert {
        "pos_embed",
        "cls_token",
        "patch_embed.proj.bias",
        "blocks.0.norm1.weight",
        "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.bias",
        "norm.weight",
        "head.bias",
    } <= undecayed
    assert all(n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token") for n in undecayed)
    decayed = sorted(n for n, d in decay_of.items() if d == 0.05)
    assert decayed == sorted(n for n in name_of.values() if n.endswith(".weight") and "norm" not in n)
    assert "patch_embed.proj.weight" in decayed and "head.weight" in decayed


def test_frozen_parameters_are_left_out(vit):
    for name, param in vit.named_parameters():
        param.requires_grad_(name.startswith(("head.", "norm.")))
    optimizer = build_optimizer(vit, OptimConfig(weight_decay=0.05))
    name_of = {id(p): n for n, p in vit.named_parameters()}
    groups = [(sorted(name_of[id(p)] for p in g["params"]), g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [(["head.bias", "norm.bias", "norm.weight"], 0.0), (["head.weight"], 0.05)]


def test_sgd_or_adamw_with_their_settings(vit):
    sgd = build_optimizer(vit, OptimConfig(name="sgd", lr=0.05, momentum=0.8, weight_decay=1e-4))
    assert type(sgd) is torch.optim.SGD
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in sgd.param_groups] == [
        (0.05, 0.8, 0.0),
        (0.05, 0.8, 1e-4),
    ]
    adamw = build_optimizer(vit, OptimConfig(name="adamw", lr=3e-4, betas=(0.8, 0.95), weight_decay=0.1))
    assert type(adamw) is torch.optim.AdamW
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in adamw.param_groups] == [
        (3e-4, (0.8, 0.95), 0.0),
        (3e-4, (0.8, 0.95), 0.1),
    ]


def test_one_sgd_step_decays_weights_but_not_biases():
    model = torch.nn.Linear(3, 2)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad, model.bias.grad = torch.ones_like(weight), torch.ones_like(bias)
    build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.5)).step()
    torch.testing.assert_close(model.weight.detach(), weight - 0.1 * (1.0 + 0.5 * weight))
    torch.testing.assert_close(model.bias.detach(), bias - 0.1 * 1.0)


def test_the_schedule_is_planned_once_and_the_scheduler_follows_it():
    """Schedule is the one plan: the scheduler's lr at every step is its factor times the peak, and
    `over` re-plans it for another run length (what a resume compares)."""
    from distvit.engine.optim import Schedule

    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_epochs=0.5)
    schedule = Schedule(cfg, steps_per_epoch=4, epochs=3)
    scheduler = schedule.scheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0))
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([schedule.factor(step) for step in range(12)])
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] < 0.05  # 2 warmup steps, then the cosine to min_lr
    longer = schedule.over(6)
    assert longer.epochs == 6 and longer.factor(11) > schedule.factor(11) and longer.lr == 1.0
    assert "lr_lambdas" in scheduler.state_dict() and scheduler.state_dict()["lr_lambdas"] == [None]
