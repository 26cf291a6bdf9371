"""Run tracking: `metrics.jsonl` in the run directory always, W&B through Accelerate's trackers optionally.

Only the main process writes or talks to W&B. A tracker that fails to start prints a warning and the
run goes on with `metrics.jsonl` alone.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distvit.config import Config

METRICS_NAME = "metrics.jsonl"


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


class RunTracker:
    def __init__(self, accelerator: Accelerator, cfg: Config, run_dir: Path):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_NAME
        self.use_wandb = False
        self._handle = None
        if accelerator.is_main_process:
            self._handle = open(self.metrics_path, "a", buffering=1)

    def start(self, cfg: Config, extra_config: dict[str, Any]) -> None:
        """Start W&B (main process decides; every rank must call this, as Accelerate expects)."""
        if cfg.tracking.backend != "wandb":
            return
        mode, reason = wandb_mode(cfg.tracking.mode)
        init_kwargs = {
            "dir": str(self.run_dir),
            "mode": mode,
            "name": cfg.tracking.run_name,
            "entity": cfg.tracking.entity,
        }
        try:
            self.accelerator.init_trackers(
                cfg.tracking.project, config={**cfg.to_dict(), **extra_config}, init_kwargs={"wandb": init_kwargs}
            )
            self.use_wandb = True
        except Exception as err:  # tracking must never stop training
            if self.accelerator.is_main_process:
                warnings.warn(f"W&B did not start ({type(err).__name__}: {err}); continuing with {METRICS_NAME} only.")
            return
        if self.accelerator.is_main_process and mode == "offline":
            self.accelerator.print(
                f"W&B is offline ({reason}): the run is saved under {self.run_dir}/wandb/. "
                f"Upload it later with `wandb sync {self.run_dir}/wandb/offline-run-*`."
            )

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (main process) and forward numeric fields to W&B under `split/name`."""
        if not self.accelerator.is_main_process:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._handle.write(json.dumps(record) + "\n")
        if self.use_wandb:
            split = record.get("split", "train")
            numbers = {
                f"{split}/{k}": v for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step",)
            }
            try:
                self.accelerator.log(numbers, step=record.get("step"))
            except Exception as err:
                warnings.warn(f"W&B logging failed ({type(err).__name__}: {err}); stopping W&B for this run.")
                self.use_wandb = False

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
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
