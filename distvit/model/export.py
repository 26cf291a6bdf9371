"""Weights for users outside distvit: RUN_DIR/model.safetensors + RUN_DIR/model.json.

model.json holds the `timm.create_model` arguments that rebuild the adapted architecture, so

    kwargs = json.load(open("model.json"))["timm_create_model"]
    model = timm.create_model(**kwargs)

loads the fine-tuned weights (timm reads the file named in `pretrained_cfg_overlay`; its num_classes
there keeps timm from dropping the new head as a mismatched classifier).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distvit.fileio import atomic_write_bytes
from distvit.model.record import SurgeryRecord

WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "model.json"


def create_model_kwargs(record: SurgeryRecord, weights_file: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model_name": record.model_name,
        "pretrained": True,
        "num_classes": record.num_classes,
        "img_size": record.img_size,
        "patch_size": record.patch_size,
        "pretrained_cfg_overlay": {"file": weights_file, "num_classes": record.num_classes},
    }
    if record.pos_embed == "dynamic":
        kwargs["dynamic_img_size"] = True
    return kwargs


def export_model(
    run_dir: Path, state_dict: dict[str, torch.Tensor], record: SurgeryRecord, info: dict[str, Any]
) -> tuple[Path, Path]:
    """Write the weights (temp file + rename) and model.json describing them; returns both paths."""
    weights = run_dir / WEIGHTS_NAME
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}
    temporary = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(temporary), metadata={"format": "pt", "model_name": record.model_name})
    os.replace(temporary, weights)
    description = {
        "timm_create_model": create_model_kwargs(record, str(weights.resolve())),
        "surgery": record.to_dict(),
        "mean": list(record.mean),
        "std": list(record.std),
        **info,
    }
    path = run_dir / INFO_NAME
    atomic_write_bytes(path, (json.dumps(description, indent=1) + "\n").encode())
    return weights, path
