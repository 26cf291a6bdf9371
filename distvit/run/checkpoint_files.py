"""Checkpoint files: written atomically, read without executing code, named and found in the run folder.

A checkpoint is one `torch.save` file of plain containers of tensors and primitives, with a
`format_version`; what it holds (the schema) is written and read in one place, distvit.engine.checkpointer.
`checkpoints/latest.json` names the newest one; `train.resume=auto` starts from it.

It is written to `<name>.tmp` and renamed, so a crash while writing leaves the previous file intact; it
is read with `weights_only=True`, so a tampered file cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distvit.errors import CheckpointError
from distvit.fileio import atomic_open, atomic_write_bytes, write_failure
from distvit.model.build import model_from_record
from distvit.model.record import SurgeryRecord

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "final.pt"
LATEST_NAME = "latest.json"


KEPT = (
    "The previous checkpoint is intact: free some space (or choose another run.dir) and continue with "
    "train.resume=auto."
)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically; a failed write (a full disk: torch reports it as a RuntimeError) is
    one CheckpointError naming the file and the free space, and the previous checkpoint stays usable."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as handle:
            torch.save({"format_version": FORMAT_VERSION, **payload}, handle)
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"{write_failure(path, err)}. {KEPT}") from None
    return path


def step_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


def mark_latest(checkpoint_dir: Path, name: str, step: int, epoch: int) -> None:
    """Record which checkpoint is the newest complete one (written after the checkpoint itself)."""
    marker = checkpoint_dir / LATEST_NAME
    try:
        atomic_write_bytes(marker, json.dumps({"file": name, "step": step, "epoch": epoch}).encode())
    except OSError as err:
        raise CheckpointError(f"{write_failure(marker, err)}. {KEPT}") from None


BEST_NAME = "best.pt"


def prune_periodic(checkpoint_dir: Path, keep_last: int, step_of: Callable[[str], int]) -> list[Path]:
    """Delete all but the `keep_last` periodic checkpoints (step_*.pt, epoch_*.pt) of the highest steps
    (`step_of(name)`; file times can tie on coarse file systems), never the one latest.json names;
    final.pt and best.pt are not periodic. Returns the deleted paths."""
    if keep_last <= 0:
        return []
    protected = None
    marker = checkpoint_dir / LATEST_NAME
    if marker.is_file():
        try:
            protected = json.loads(marker.read_text()).get("file")
        except (ValueError, AttributeError):
            pass
    periodic = sorted(
        (p for p in checkpoint_dir.glob("*.pt") if p.name.startswith(("step_", "epoch_"))),
        key=lambda p: step_of(p.name),
    )
    deleted = []
    for path in periodic[:-keep_last]:
        if path.name != protected:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory, or None when it has none."""
    marker = Path(run_dir) / CHECKPOINT_DIR / LATEST_NAME
    if not marker.is_file():
        if list(marker.parent.glob("*.pt")):  # a crash between writing a checkpoint and marking it
            raise CheckpointError(
                f"{marker.parent} holds checkpoints but no {LATEST_NAME}; pass train.resume=<one of them> explicitly."
            )
        return None
    try:
        name = json.loads(marker.read_text())["file"]
        if not isinstance(name, str):
            raise TypeError(name)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{marker} is damaged; point train.resume at a checkpoint file instead.") from None
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(
            f"{marker} names {name!r}, not a file of {marker.parent}: it may only name a checkpoint beside it. "
            "Point train.resume at a checkpoint file instead."
        )
    path = marker.parent / name
    if not path.is_file():
        raise CheckpointError(f"{marker} names {path.name}, which is missing; point train.resume at a checkpoint file.")
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


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", require: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A distvit checkpoint's payload, with the keys `require` names present and of their type (KEY_TYPES)."""
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
    missing = [key for key in require if not isinstance(payload.get(key), KEY_TYPES[key])]
    if missing:
        raise CheckpointError(
            f"{path} is incomplete or damaged: {', '.join(missing)} missing or of the wrong type. Use a checkpoint "
            "that distvit wrote (RUN_DIR/checkpoints/)."
        )
    return payload


KEY_TYPES = {
    "model": dict,
    "surgery": dict,
    "config": dict,
    "classes": list,
    "epoch": int,
    "step": int,
    "optimizer": dict,
    "scheduler": dict,
    "data": dict,
    "metrics": dict,
    "rng": list,
}
"""The type of each checkpoint key a reader may require (resume requires them all, evaluate a few)."""


WEIGHTS = ("model", "ema")


def load_model(
    path: str | os.PathLike, weights: str = "model", require: tuple[str, ...] = ("model", "surgery")
) -> tuple[torch.nn.Module, SurgeryRecord, dict[str, Any]]:
    """Rebuild the model of a checkpoint (or a run directory's final one) from its surgery record and load
    its weights: the trained model's, or (weights="ema") the EMA's."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}.")
    path = resolve_checkpoint(path)
    payload = load_checkpoint(path, require=require)
    if payload.get(weights) is None:
        raise CheckpointError(
            f"{path} holds no EMA weights: the run trained without EMA (ema.enabled=false). "
            f"Use the model's weights (--weights model), or train with ema.enabled=true."
        )
    record = SurgeryRecord.from_dict(payload["surgery"])
    model = model_from_record(record)
    load_weights(model, payload[weights], record, source=f"{path}" + (" (ema)" if weights == "ema" else ""))
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
        details = "; ".join(
            mismatched[:3] + [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
        )
        raise CheckpointError(
            f"{source} was written for a different model ({record.architecture()}): {details}. "
            f"Rebuild the model from the checkpoint's surgery record (distvit.run.checkpoint_files.load_model)."
        )
    model.load_state_dict(state)
