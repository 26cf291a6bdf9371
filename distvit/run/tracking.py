"""Run tracking: `metrics.jsonl` in the run directory always, W&B through Accelerate's trackers optionally.

Only the main process writes or talks to W&B. A tracker that fails to start prints a warning and the
run goes on with `metrics.jsonl` alone. This module reads the tracking section.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distvit.config import TrackingConfig
from distvit.errors import DistvitError
from distvit.fileio import atomic_write_bytes, write_failure

METRICS_NAME = "metrics.jsonl"
TRACKER_NAME = "tracker.json"


def resolve_run_id(run_dir: Path, checkpoint_tracker: dict[str, Any] | None) -> str:
    """The W&B run id of this training run: the checkpoint's (a resumed or requeued job continues the
    same W&B run), else the run directory's tracker.json, else a new one (written there)."""
    if checkpoint_tracker and checkpoint_tracker.get("wandb_run_id"):
        return str(checkpoint_tracker["wandb_run_id"])
    path = run_dir / TRACKER_NAME
    if path.is_file():
        try:
            return str(json.loads(path.read_text())["wandb_run_id"])
        except (ValueError, KeyError, TypeError):
            pass  # damaged: start a new id below
    run_id = secrets.token_hex(4)  # W&B ids: 8 characters of [a-z0-9]
    atomic_write_bytes(path, json.dumps({"wandb_run_id": run_id}).encode())
    return run_id


def wandb_mode(requested: str) -> tuple[str, str]:
    """(mode, reason): 'auto' is online only when an API key is configured."""
    if requested != "auto":
        return requested, f"tracking.mode={requested}"
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online", "an api.wandb.ai login is in ~/.netrc"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline", "no W&B API key found"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def log_with(cfg: TrackingConfig) -> str | None:
    """The tracker Accelerate is created with (None: metrics.jsonl only)."""
    return "wandb" if cfg.backend == "wandb" else None


class RunTracker:
    def __init__(
        self, cfg: TrackingConfig, *, accelerator: Accelerator, run_dir: Path, class_names: list[str] | None = None
    ):
        self.cfg, self.accelerator = cfg, accelerator
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_NAME
        self.class_names = class_names or []
        self.use_wandb = False
        self.run_id: str | None = None
        self._handle = None
        if accelerator.is_main_process:
            self._handle = open(self.metrics_path, "a", buffering=1)

    def start(self, config: dict[str, Any], checkpoint_tracker: dict[str, Any] | None = None) -> None:
        """Start W&B on the main process with `config` (the run's, resolved, and what it adds), continuing
        the run id of `checkpoint_tracker` when resuming. Every rank must call this, as Accelerate expects."""
        cfg = self.cfg
        if log_with(cfg) != "wandb":
            return
        if self.accelerator.is_main_process:
            self.run_id = resolve_run_id(self.run_dir, checkpoint_tracker)
        mode, reason = wandb_mode(cfg.mode)
        init_kwargs = {
            "dir": str(self.run_dir),
            "mode": mode,
            "name": cfg.run_name,
            "entity": cfg.entity,
            "id": self.run_id,
            "resume": "allow",
        }
        try:
            self.accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": init_kwargs})
            self.use_wandb = True
            if self.accelerator.is_main_process:
                # Charts use distvit's optimizer step, logged as a value, not W&B's own step: after a resume
                # from an earlier checkpoint W&B would drop every point up to its previous maximum step.
                run = self.accelerator.get_tracker("wandb", unwrap=True)
                run.define_metric("step")
                run.define_metric("*", step_metric="step")
        except Exception as err:  # tracking must never stop training
            if self.accelerator.is_main_process:
                warnings.warn(f"W&B did not start ({type(err).__name__}: {err}); continuing with {METRICS_NAME} only.")
            return
        if self.accelerator.is_main_process and mode == "offline":
            self.accelerator.print(
                f"W&B is offline ({reason}): run {self.run_id} is saved under {self.run_dir}/wandb/. "
                f"Upload it later with `wandb sync --id {self.run_id} {self.run_dir}/wandb/offline-run-*`."
            )

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (main process) and forward numeric fields to W&B under `split/name`."""
        if not self.accelerator.is_main_process:
            return
        record = {k: _clean(v) for k, v in record.items()}
        try:
            self._handle.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: one line, and the checkpoints already written stay usable
            raise DistvitError(
                f"{write_failure(self.metrics_path, err)}. The latest checkpoint is intact: free some space and "
                "continue with train.resume=auto."
            ) from None
        if self.use_wandb:
            split = record.get("split", "train")
            numbers = {
                f"{split}/{k}": v
                for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step",)
            }
            for key, values in record.items():  # per-class lists: one chart per class
                if key.endswith("per_class_accuracy") and isinstance(values, list):
                    for index, value in enumerate(values):
                        if value is not None:
                            numbers[f"{split}/{key}/{self._class_name(index)}"] = value
            self._to_wandb(numbers, record.get("step"))

    def _class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else f"class_{index}"

    def _to_wandb(self, values: dict[str, Any], step: int | None) -> None:
        try:
            self.accelerator.log({**values, "step": step} if step is not None else values)
        except Exception as err:
            warnings.warn(f"W&B logging failed ({type(err).__name__}: {err}); stopping W&B for this run.")
            self.use_wandb = False

    def log_images(self, key: str, samples: list[dict[str, Any]], step: int) -> None:
        """Main process: a grid of sample predictions ({'image': HxWxC uint8, 'label', 'predicted'})."""
        if not (self.accelerator.is_main_process and self.use_wandb and samples):
            return
        import wandb

        images = [
            wandb.Image(
                s["image"].numpy(), caption=f"{self._class_name(s['predicted'])} (true {self._class_name(s['label'])})"
            )
            for s in samples
        ]
        self._to_wandb({key: images}, step)

    def log_image_files(self, paths: dict[str, Path], step: int) -> None:
        """Main process: PNG files (the confusion matrix plots) as W&B images."""
        if not (self.accelerator.is_main_process and self.use_wandb and paths):
            return
        import wandb

        self._to_wandb({key: wandb.Image(str(path)) for key, path in paths.items()}, step)

    def finish(self) -> None:
        for tracker in self.accelerator.trackers:
            try:
                tracker.finish()
            except Exception as err:
                warnings.warn(f"{tracker.name} did not finish cleanly ({type(err).__name__}: {err}).")
        self.accelerator.trackers = []  # finished here; end_training() then only tears down the process group
        self.use_wandb = False
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    from distvit.run.plots import read_metrics_lines

    return read_metrics_lines(Path(run_dir) / METRICS_NAME)
