"""Checkpoint files: written atomically, read without executing code.

A checkpoint is one `torch.save` file holding plain containers of tensors and primitives:

    format_version, model (state dict), optimizer, scheduler, epoch, step,
    surgery (SurgeryRecord as dict), classes, config (resolved, as dict), metrics (last evaluation)

It is written to `<name>.tmp` and renamed, so a crash while writing leaves the previous file intact; it
is read with `weights_only=True`, so a tampered file cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from distvit.errors import CheckpointError
from distvit.fileio import atomic_open
from distvit.surgery import SurgeryRecord, model_from_record

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "final.pt"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as handle:
        torch.save({"format_version": FORMAT_VERSION, **payload}, handle)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its final checkpoint)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_DIR / FINAL_NAME
        if not candidate.is_file():
            raise CheckpointError(f"run directory {path} has no {CHECKPOINT_DIR}/{FINAL_NAME}: the run did not finish.")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        raise CheckpointError(f"{path} is not a readable distvit checkpoint ({type(err).__name__}: {err}).") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a distvit checkpoint of format version {FORMAT_VERSION} "
            f"(found {payload.get('format_version') if isinstance(payload, dict) else type(payload).__name__})."
        )
    return payload


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, SurgeryRecord, dict[str, Any]]:
    """Rebuild the model of a checkpoint from its surgery record and load its weights."""
    payload = load_checkpoint(path)
    record = SurgeryRecord.from_dict(payload["surgery"])
    model = model_from_record(record)
    load_weights(model, payload["model"], record, source=str(path))
    return model, record, payload


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], record: SurgeryRecord, source: str) -> None:
    """Load a state dict, turning shape mismatches into an error that names the surgery difference."""
    expected = model.state_dict()
    mismatched = [
        f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
        for name, tensor in state.items()
        if name in expected and expected[name].shape != tensor.shape
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if mismatched or missing or unexpected:
        details = "; ".join(mismatched[:3] + [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise CheckpointError(
            f"{source} was written for a different model ({record.architecture()}): {details}. "
            f"Rebuild the model from the checkpoint's surgery record (distvit.checkpoint.load_model)."
        )
    model.load_state_dict(state)
