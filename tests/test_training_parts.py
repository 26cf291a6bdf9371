"""The engine's parts in isolation: mixing, losses, EMA, schedules, lr scaling, checkpoint pruning,
stop requests, subsets, export, exact evaluation counts."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import timm
import torch
import torch.nn.functional as F

from distvit.run.checkpoint import prune_periodic
from distvit.config import DataConfig, EmaConfig, OptimConfig, load_config
from distvit.data.plan import subset_indices
from distvit.engine.ema import ModelEma, decay_for_run
from distvit.errors import ConfigError
from distvit.engine.losses import distillation_loss, label_loss
from distvit.engine.mixing import apply_mix, mixed_targets, sample_mix
from distvit.engine.optim import build_optimizer, build_scheduler, lr_factor, lr_multiplier
from helpers import REPO


def build(cfg, num_classes):
    """build_model from a whole Config (its model and surgery sections)."""
    return build_model(cfg.model, cfg.surgery, num_classes)


def test_mixup_targets_and_images_mix_with_the_mirror():
    cfg = DataConfig(mixup_alpha=0.8)
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
    cfg = DataConfig(cutmix_alpha=1.0)
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
    assert sample_mix(DataConfig(mixup_alpha=1.0, mix_prob=0.0), [1, 1], 8, 8).kind == "none"
    both = DataConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mix_switch_prob=0.5)
    kinds = [sample_mix(both, [s, 1], 8, 8).kind for s in range(200)]
    assert 60 < kinds.count("cutmix") < 140 and kinds.count("none") == 0


def test_label_loss_matches_torch_and_soft_targets():
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    expected = F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(label_loss(logits, labels, 0.1, None), expected)
    smoothed = F.one_hot(labels, 10) * 0.9 + 0.01
    torch.testing.assert_close(label_loss(logits, labels, 0.0, smoothed), expected)


def test_distillation_losses():
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    assert distillation_loss(teacher, teacher, "soft", 3.0).abs().max() < 1e-5
    soft = distillation_loss(student, teacher, "soft", 2.0)
    # DeiT: KL summed, times tau^2, divided by batch x classes (here per sample: by the 10 classes)
    manual = (F.softmax(teacher / 2, 1) * (F.log_softmax(teacher / 2, 1) - F.log_softmax(student / 2, 1))).sum(1) * 4 / 10
    torch.testing.assert_close(soft, manual)
    hard = distillation_loss(student, teacher, "hard", 1.0)
    torch.testing.assert_close(hard, F.cross_entropy(student, teacher.argmax(1), reduction="none"))


def test_ema_decay_follows_the_run_length_and_updates():
    assert decay_for_run(EmaConfig(horizon=0.1), 1000) == pytest.approx(0.99)
    assert decay_for_run(EmaConfig(decay=0.5), 1000) == 0.5
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9, warmup=False)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * start + 0.1 * model.weight)
    warm = ModelEma(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early weights do not dominate
    frozen = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    frozen[0].requires_grad_(False)
    assert len(ModelEma(frozen, 0.9, False)._pairs) == 2  # only the trainable weight and bias are averaged


def test_step_schedule_warmup_and_lr_scaling():
    assert [lr_factor(s, 100, 10, "step", 0.0, (40, 70), 0.1) for s in (0, 9, 10, 39, 40, 69, 70, 99)] == pytest.approx(
        [0.1, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
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


def test_config_checks_for_the_new_keys(tmp_path):
    data = tmp_path / "ds"
    from distvit.data.synthetic import prepare_synthetic

    prepare_synthetic(data, train_size=20, test_size=10, samples_per_shard=64)
    base = [f"data.path={data}"]
    cases = {
        "optim.schedule=step": "optim.schedule=step needs optim.step_epochs",
        "optim.step_epochs=[2,1]": "must be in increasing order",
        "train.grad_accum_steps=3": "not divisible by train.grad_accum_steps=3",
        "distill.type=soft": "distill.type=soft needs distill.teacher",
        "distill.teacher=deit_tiny_patch16_22": "did you mean deit_tiny_patch16_224",
        "ema.decay=1.5": "ema.decay",
    }
    for override, message in cases.items():
        extra = ["distill.type=soft"] if override.startswith("distill.teacher") else []
        with pytest.raises(ConfigError, match=None) as err:
            load_config(REPO / "configs/demo.yaml", [*base, override, *extra])
        assert message in str(err.value), (override, str(err.value))


def test_subset_is_fixed_by_seed_and_size():
    a = subset_indices(1000, 100, seed=0)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and torch.equal(a, subset_indices(1000, 100, seed=0))
    assert not torch.equal(a, subset_indices(1000, 100, seed=1))
    assert torch.equal(a, a.sort().values)


def test_prune_keeps_the_newest_periodic_and_the_latest(tmp_path):
    names = ["step_00000002.pt", "epoch_001.pt", "step_00000006.pt", "step_00000008.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**9, 10**9))  # equal times (coarse file system): order by step
    for name in ("best.pt", "final.pt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "latest.json").write_text(json.dumps({"file": "step_00000002.pt"}))
    step_of = {"step_00000002.pt": 2, "epoch_001.pt": 4, "step_00000006.pt": 6, "step_00000008.pt": 8}.get
    deleted = prune_periodic(tmp_path, keep_last=2, step_of=step_of)
    assert sorted(p.name for p in deleted) == ["epoch_001.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "best.pt", "final.pt", "step_00000002.pt", "step_00000006.pt", "step_00000008.pt"]
    assert prune_periodic(tmp_path, keep_last=0, step_of=step_of) == []


def test_stop_requests_from_signal_and_file(tmp_path):
    from accelerate import Accelerator

    from distvit.engine.stopping import StopRequests

    stops = StopRequests(tmp_path, Accelerator(cpu=True), every=5)
    try:
        assert stops.agreed(5) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stops.agreed(3) is None  # only every 5th step (the same steps on every rank)
        assert stops.agreed(10) == "SIGUSR1"
        stops.received = None
        (tmp_path / "STOP").touch()
        assert stops.agreed(7, force=True) == "STOP file"
        stops.consume_stop_file()
        assert not (tmp_path / "STOP").exists() and stops.agreed(10) is None
    finally:
        stops.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_exported_weights_load_with_timm_create_model(tmp_path):
    from distvit.model.export import export_model
    from distvit.model.build import build_model

    data = tmp_path / "ds"
    from distvit.data.synthetic import prepare_synthetic

    prepare_synthetic(data, train_size=20, test_size=10, samples_per_shard=64)
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.path={data}", "surgery.patch_size=4", "surgery.pos_embed=truncate"])
    model, record = build_model(cfg.model, cfg.surgery, 10)
    with torch.no_grad():
        model.head.weight.normal_()  # not timm's init: the exported head must be the one loaded
    weights, info = export_model(tmp_path, model.state_dict(), record, {"classes": list("abcdefghij")})
    description = json.loads(info.read_text())
    rebuilt = timm.create_model(**description["timm_create_model"]).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    assert description["classes"] == list("abcdefghij") and not list(tmp_path.glob("*.tmp"))


def test_evaluation_counts_top5_and_confusion():
    from accelerate import Accelerator

    from distvit.data.memory import SplitTensors
    from distvit.data.loader import MemoryBatches
    from distvit.data.transforms import BatchTransform
    from distvit.engine.evaluation import evaluate_models

    class Fixed(torch.nn.Module):
        """Predicts class (mean pixel value * 10), then class 0, then the others in index order."""

        def forward(self, x):
            target = (x.mean(dim=(1, 2, 3)) * 10).round().long().clamp(0, 9)
            logits = -0.01 * torch.arange(10.0).expand(x.shape[0], 10).clone()
            logits[torch.arange(x.shape[0]), target] = 2.0
            logits[:, 0] += 1.0
            return logits

    values = torch.tensor([0.1, 0.2, 0.2, 0.5, 0.9, 0.3, 0.0, 0.1])
    images = (values.view(-1, 1, 1, 1) * 255).round().to(torch.uint8).expand(-1, 4, 4, 3).contiguous()
    labels = torch.tensor([1, 2, 3, 5, 9, 4, 0, 8])
    data = MemoryBatches(SplitTensors(images=images, labels=labels))
    transform = BatchTransform((4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    result = evaluate_models({"m": Fixed()}, data, transform, 3, Accelerator(cpu=True), 10)["m"]
    assert (result.correct, result.num_samples) == (5, 8)  # 3 -> 2, 4 -> 3 and 8 -> 1 are wrong
    assert result.confusion[3][2] == 1 and result.confusion[4][3] == 1 and result.confusion[8][1] == 1
    assert sum(map(sum, result.confusion)) == 8
    assert result.top5_correct == 7  # 3 and 4 are in their top 5 ({2, 0, 1, 3, 4}, {3, 0, 1, 2, 4}), 8 is not
    assert result.per_class_accuracy()[3] == 0.0 and result.per_class_accuracy()[9] == 1.0
    assert result.per_class_accuracy()[6] is None


def test_teachers_must_predict_the_datasets_classes(tmp_path, monkeypatch):
    from distvit.engine import teacher as teacher_module
    from distvit.run.checkpoint import save_checkpoint
    from distvit.config import DistillConfig

    classes = [f"c{i}" for i in range(10)]
    # hub weights keep their 1000-class ImageNet head: refused, not silently given a random 10-class head
    monkeypatch.setattr(teacher_module.timm, "create_model", lambda name, **kw: timm.models.create_model(name, pretrained=False, **{
        k: v for k, v in kw.items() if k not in ("pretrained",)}))
    with pytest.raises(ConfigError, match="predicts 1000 classes, the dataset has 10"):
        teacher_module.load_teacher(DistillConfig(type="soft", teacher="deit_tiny_patch16_224"), classes, torch.device("cpu"))
    monkeypatch.undo()
    # a weights file with another head size: an actionable error
    weights = tmp_path / "imagenet.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), weights)
    with pytest.raises(ConfigError, match="could not be loaded"):
        teacher_module.load_teacher(DistillConfig(type="soft", teacher="deit_tiny_patch16_224", teacher_weights=str(weights)),
                             classes, torch.device("cpu"))
    # a distvit checkpoint trained on other classes (same count, other order)
    from distvit.data.synthetic import prepare_synthetic
    from distvit.model.build import build_model

    prepare_synthetic(tmp_path / "ds", train_size=20, test_size=10, samples_per_shard=64)
    model, record = build(load_config(REPO / "configs/demo.yaml", [f"data.path={tmp_path}/ds"]), 10)
    save_checkpoint(tmp_path / "t.pt", {"model": model.state_dict(), "surgery": record.to_dict(), "classes": classes[::-1]})
    with pytest.raises(ConfigError, match="same classes in the same order"):
        teacher_module.load_teacher(DistillConfig(type="soft", teacher=str(tmp_path / "t.pt")), classes, torch.device("cpu"))
    teacher = teacher_module.load_teacher(DistillConfig(type="soft", teacher=str(tmp_path / "t.pt")), classes[::-1], torch.device("cpu"))
    assert teacher.img_size == 32 and not any(p.requires_grad for p in teacher.model.parameters())


def _head_only_run(data, run_dir, *overrides):
    from distvit.data.manifest import read_manifest
    from distvit.engine.trainer import run_training

    cfg = load_config(REPO / "configs/demo.yaml", [
        f"data.path={data}", f"run.dir={run_dir}", "surgery.freeze=backbone", "data.augment=none",
        "train.epochs=2", "train.batch_size=32", "train.eval_batch_size=40", "train.mixed_precision=no",
        "data.train_subset=150", "optim.lr=0.05", "ema.enabled=true", "tracking.backend=none", *overrides,
    ])
    return run_training(cfg, read_manifest(data))


def test_head_only_training_on_cached_features_gives_the_same_head(small_dataset, tmp_path):
    """The lesson's head-only fine-tune: the head trained on cached backbone features equals the head
    trained with the full forward every step (fp32; float rounding of the summation order only)."""
    from distvit.run.checkpoint import load_checkpoint

    cached = _head_only_run(small_dataset, tmp_path / "cached")
    full = _head_only_run(small_dataset, tmp_path / "full", "train.cache_features=false")
    assert cached["feature_cache_seconds"] > 0 and full["feature_cache_seconds"] is None
    a = load_checkpoint(tmp_path / "cached" / "checkpoints" / "final.pt")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "final.pt")
    assert a["step"] == b["step"] == 2 * 5  # 150 images, batch 32: 5 steps per epoch
    for key in ("model", "ema"):
        for name in ("head.weight", "head.bias"):
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=2e-6)
        frozen = [k for k in a[key] if not k.startswith("head.")]
        assert all(torch.equal(a[key][k], b[key][k]) for k in frozen)  # the backbone never changed
    assert cached["final"]["correct"] == full["final"]["correct"]


def test_cache_features_true_names_what_prevents_it(small_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"train.cache_features=true needs a head-only run, but: data.augment=crop_flip"):
        _head_only_run(small_dataset, tmp_path / "r", "train.cache_features=true", "data.augment=crop_flip")


def test_precision_auto_and_ddp_options(monkeypatch):
    from distvit.engine.runtime import ddp_options, resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    assert resolve_mixed_precision("auto") == "fp16" and resolve_mixed_precision("no") == "no"
    every = load_config(REPO / "configs/demo.yaml", check_data=False)
    assert ddp_options(every) == {"static_graph": True, "gradient_as_bucket_view": True}
    accumulating = load_config(REPO / "configs/demo.yaml", ["train.grad_accum_steps=2"], check_data=False)
    assert ddp_options(accumulating) == {"static_graph": False, "gradient_as_bucket_view": True}  # pytorch#143580
    for frozen in ("surgery.freeze=backbone", "surgery.freeze=blocks:2", "surgery.freeze_embeddings=true"):
        cfg = load_config(REPO / "configs/demo.yaml", [frozen], check_data=False)
        assert ddp_options(cfg) == {"static_graph": False, "gradient_as_bucket_view": False}
