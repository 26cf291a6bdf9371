"""distvit.model.export: exported weights load with timm.create_model alone."""

from __future__ import annotations

import json

import timm
import torch

from distvit.config import load_config
from tests.support.helpers import REPO


def test_exported_weights_load_with_timm_create_model(tmp_path):
    from distvit.model.build import build_model
    from distvit.model.export import export_model

    data = tmp_path / "ds"
    from distvit.data.prepare.synthetic import prepare_synthetic

    prepare_synthetic(data, train_size=20, test_size=10, samples_per_shard=64)
    cfg = load_config(
        REPO / "configs/demo.yaml", [f"data.path={data}", "surgery.patch_size=4", "surgery.pos_embed=truncate"]
    )
    model, record = build_model(cfg.model, cfg.surgery, 10)
    with torch.no_grad():
        model.head.weight.normal_()  # not timm's init: the exported head must be the one loaded
    weights, info = export_model(tmp_path, model.state_dict(), record, {"classes": list("abcdefghij")})
    description = json.loads(info.read_text())
    rebuilt = timm.create_model(**description["timm_create_model"]).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    assert description["classes"] == list("abcdefghij") and not list(tmp_path.glob("*.tmp"))
