"""distvit.engine.teacher: a teacher must predict the dataset's classes, in the same order."""

from __future__ import annotations

import pytest
import timm
import torch

from distvit.config import load_config
from distvit.errors import ConfigError
from distvit.model.build import build_model
from tests.support.helpers import REPO


def build(cfg, num_classes):
    """build_model from a whole Config (its model and surgery sections)."""
    return build_model(cfg.model, cfg.surgery, num_classes)


def test_teachers_must_predict_the_datasets_classes(tmp_path, monkeypatch):
    from distvit.config import DistillConfig
    from distvit.engine import teacher as teacher_module
    from distvit.run.checkpoint_files import save_checkpoint

    classes = [f"c{i}" for i in range(10)]
    # hub weights keep their 1000-class ImageNet head: refused, not silently given a random 10-class head
    monkeypatch.setattr(
        teacher_module.timm,
        "create_model",
        lambda name, **kw: timm.models.create_model(
            name, pretrained=False, **{k: v for k, v in kw.items() if k not in ("pretrained",)}
        ),
    )
    with pytest.raises(ConfigError, match="predicts 1000 classes, the dataset has 10"):
        teacher_module.load_teacher(
            DistillConfig(type="soft", teacher="deit_tiny_patch16_224"), classes, torch.device("cpu")
        )
    monkeypatch.undo()
    # a weights file with another head size: an actionable error
    weights = tmp_path / "imagenet.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), weights)
    with pytest.raises(ConfigError, match="could not be loaded"):
        teacher_module.load_teacher(
            DistillConfig(type="soft", teacher="deit_tiny_patch16_224", teacher_weights=str(weights)),
            classes,
            torch.device("cpu"),
        )
    # a distvit checkpoint trained on other classes (same count, other order)
    from distvit.data.prepare.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "ds", train_size=20, test_size=10, samples_per_shard=64)
    model, record = build(load_config(REPO / "configs/demo.yaml", [f"data.path={tmp_path}/ds"]), 10)
    save_checkpoint(
        tmp_path / "t.pt", {"model": model.state_dict(), "surgery": record.to_dict(), "classes": classes[::-1]}
    )
    with pytest.raises(ConfigError, match="same classes in the same order"):
        teacher_module.load_teacher(
            DistillConfig(type="soft", teacher=str(tmp_path / "t.pt")), classes, torch.device("cpu")
        )
    teacher = teacher_module.load_teacher(
        DistillConfig(type="soft", teacher=str(tmp_path / "t.pt")), classes[::-1], torch.device("cpu")
    )
    assert teacher.img_size == 32 and not any(p.requires_grad for p in teacher.model.parameters())
