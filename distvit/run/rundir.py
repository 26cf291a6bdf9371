"""The run directory: what a run writes, where, and when a directory may be (re)used.

RUN_DIR/config.yaml        resolved configuration (written before the first step)
RUN_DIR/metrics.jsonl      one JSON object per line (training and evaluation)
RUN_DIR/checkpoints/       final.pt, epoch_NNN.pt, step_NNNNNNNN.pt, latest.json
RUN_DIR/checkpoints/best.pt  the best evaluation so far (checkpoint.keep_best)
RUN_DIR/eval/confusion.json  confusion matrix of the latest evaluation (raw and EMA)
RUN_DIR/plots/             loss, lr, accuracy and confusion PNGs (`distvit report RUN_DIR` redraws them)
RUN_DIR/model.safetensors  exported weights + model.json (timm.create_model arguments), at the end
RUN_DIR/summary.json       final results, written last: its presence marks a finished run
RUN_DIR/stopped.json       present while the run is stopped on request (signal, STOP file, stop_at_step)
RUN_DIR/STOP               create it to make a running job checkpoint and stop
RUN_DIR/tracker.json       the W&B run id, continued by resumed and requeued jobs
RUN_DIR/wandb/             W&B files (when tracking.backend=wandb)
RUN_DIR/trace/             sample indices per rank and step (when data.trace_samples=true)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from distvit.config import Config
from distvit.errors import ConfigError
from distvit.fileio import atomic_write_bytes
from distvit.run.checkpoint import CHECKPOINT_DIR
from distvit.run.tracking import METRICS_NAME, TRACKER_NAME

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
STOPPED_NAME = "stopped.json"
CONFUSION_NAME = "eval/confusion.json"
WANDB_DIR = "wandb"
TRACE_DIR = "trace"
# STOP is not cleared: a stop request that arrives while a job starts up (a signal to the Slurm batch
# shell) must still stop it.
_RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, STOPPED_NAME, METRICS_NAME, TRACKER_NAME, "model.safetensors", "model.json")
_RUN_FOLDERS = (CHECKPOINT_DIR, WANDB_DIR, TRACE_DIR, "eval", "plots")


def check_run_dir(cfg: Config) -> Path:
    """Refuse to start a new run on top of an earlier one unless run.overwrite is set, and make sure the
    directory can be written. Every rank calls this before training starts; rank 0 writes nothing until
    all ranks have passed it (see engine.run_training)."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir!r} is a file; it must be a directory (it is created if missing).")
    if (run_dir / CONFIG_NAME).exists() and not (cfg.run.overwrite or cfg.train.resume):
        raise ConfigError(
            f"run.dir={cfg.run.dir!r} already holds a run ({CONFIG_NAME} exists). Continue it with "
            f"train.resume=auto, choose another run.dir, or pass run.overwrite=true to replace its results."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"run.dir={cfg.run.dir!r} cannot be created ({err.strerror}). Choose another run.dir."
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={cfg.run.dir!r} is not writable by this user. Choose another run.dir.")
    return run_dir


def init_run_dir(run_dir: Path, cfg: Config, resumed_step: int | None) -> None:
    """Main process only. A new run clears an earlier run's results (run.overwrite, or train.resume=auto
    finding no checkpoint); a resumed run drops what was logged after its checkpoint. Then the resolved
    config is written."""
    if resumed_step is None:
        if cfg.run.overwrite or cfg.train.resume:
            for name in _RUN_FILES:
                # resume=auto before the first checkpoint (a requeued job) is the same run: same W&B run
                if not (name == TRACKER_NAME and cfg.train.resume):
                    (run_dir / name).unlink(missing_ok=True)
            for folder in _RUN_FOLDERS:
                if not (folder == WANDB_DIR and cfg.train.resume):
                    shutil.rmtree(run_dir / folder, ignore_errors=True)
    else:
        (run_dir / SUMMARY_NAME).unlink(missing_ok=True)
        (run_dir / STOPPED_NAME).unlink(missing_ok=True)
        logs = [run_dir / METRICS_NAME, *sorted((run_dir / TRACE_DIR).glob("*.jsonl"))]
        for log in logs:
            _drop_lines_after(log, resumed_step)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG_NAME, cfg.to_yaml().encode())


def _drop_lines_after(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` logged at or before `step` (an interrupted run may have logged more)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            pass  # blank, or the half-written last line of a killed run
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_bytes(run_dir / SUMMARY_NAME, (json.dumps(summary, indent=1) + "\n").encode())


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY_NAME).read_text())
