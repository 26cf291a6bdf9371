"""Model-building helpers shared by unit tests."""

from __future__ import annotations

from distvit.config import load_config
from distvit.model.build import build_model


def surgery(small_dataset, weights, *overrides, classes=1000):
    cfg = load_config(None, [f"data.path={small_dataset}", f"model.pretrained={weights}", *overrides])
    model, record = build_model(cfg.model, cfg.surgery, classes)
    return model.eval(), record
