"""The run directory: what a run writes, where, and when a directory may be (re)used.

    RUN_DIR/config.yaml        resolved configuration (written before the first step)
    RUN_DIR/metrics.jsonl      one JSON object per line (training and evaluation)
    RUN_DIR/checkpoints/       final.pt (+ epoch_NNN.pt when checkpoint.every_epochs > 0)
    RUN_DIR/summary.json       final results, written last: its presence marks a finished run
    RUN_DIR/wandb/             W&B files (when tracking.backend=wandb)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from distvit.checkpoint import CHECKPOINT_DIR
from distvit.config import Config
from distvit.errors import ConfigError
from distvit.fileio import atomic_write_bytes
from distvit.tracking import METRICS_NAME

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
WANDB_DIR = "wandb"


def check_run_dir(cfg: Config) -> Path:
    """Refuse to start a new run on top of an earlier one unless run.overwrite is set, and make sure the
    directory can be written. Every rank calls this before training starts; rank 0 writes nothing until
    all ranks have passed it (see engine.run_training)."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir!r} is a file; it must be a directory (it is created if missing).")
    if (run_dir / CONFIG_NAME).exists() and not cfg.run.overwrite:
        raise ConfigError(
            f"run.dir={cfg.run.dir!r} already holds a run ({CONFIG_NAME} exists). Choose another run.dir, "
            f"or pass run.overwrite=true to replace its results."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.dir={cfg.run.dir!r} cannot be created ({err.strerror}). Choose another run.dir.") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={cfg.run.dir!r} is not writable by this user. Choose another run.dir.")
    return run_dir


def init_run_dir(run_dir: Path, cfg: Config) -> None:
    """Main process only: clear an overwritten run's results, then write the resolved config."""
    if cfg.run.overwrite:
        for name in (CONFIG_NAME, SUMMARY_NAME, METRICS_NAME):
            (run_dir / name).unlink(missing_ok=True)
        for folder in (CHECKPOINT_DIR, WANDB_DIR):
            shutil.rmtree(run_dir / folder, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG_NAME, cfg.to_yaml().encode())


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_bytes(run_dir / SUMMARY_NAME, (json.dumps(summary, indent=1) + "\n").encode())


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY_NAME).read_text())
