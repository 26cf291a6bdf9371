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
RUN_DIR/STOP               create it to make a running job checkpoint and stop (with text: for good, the
                           text its stop_reason in summary.json; a sweep prunes a trial so)
RUN_DIR/tracker.json       the W&B run id, continued by resumed and requeued jobs
RUN_DIR/wandb/             W&B files (when tracking.backend=wandb)
RUN_DIR/trace/             sample indices per rank and step (when data.trace_samples=true)
RUN_DIR/distvit-run.json   written first by a new run: marks the folder as a distvit run's
RUN_DIR/.distvit-lock      held (flock) by the run's rank 0 while it runs: a second run there is refused

distvit deletes or replaces files only in a folder that holds a distvit run, and only the files a run
writes (the names above); anything else in it, a user's own files included, stays. This module reads the
run section; whether the run resumes (train.resume) is given to it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from distvit.config import RunConfig
from distvit.errors import ConfigError
from distvit.fileio import atomic_write_bytes, hold_lock, lock_holder
from distvit.run.checkpoint_files import CHECKPOINT_DIR
from distvit.run.tracking import METRICS_NAME, TRACKER_NAME

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
STOPPED_NAME = "stopped.json"
CONFUSION_NAME = "eval/confusion.json"
WANDB_DIR = "wandb"
TRACE_DIR = "trace"
# STOP is not cleared: a stop request that arrives while a job starts up (a signal to the Slurm batch
# shell) must still stop it.
RUN_RECORD = "distvit-run.json"
LOCK_NAME = ".distvit-lock"
_RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, STOPPED_NAME, METRICS_NAME, TRACKER_NAME, "model.safetensors", "model.json")
# The files a run writes in each of its folders (atomic writes go through `<name>.tmp`): the only ones
# an overwrite deletes there.
_RUN_FOLDERS = {
    CHECKPOINT_DIR: re.compile(r"((final|best|epoch_\d+|step_\d+)\.pt|latest\.json)(\.tmp)?"),
    "eval": re.compile(r"confusion\.json(\.tmp)?"),
    "plots": re.compile(r"(loss|accuracy|lr|confusion|confusion_ema)\.png(\.tmp)?"),
    TRACE_DIR: re.compile(r"rank\d+\.jsonl"),
    WANDB_DIR: re.compile(r"(offline-)?run-.+|latest-run|debug(-internal|-cli\..+)?\.log"),
}
# Present before a run starts: the STOP file (a stop request for a starting job) and the Slurm scripts' logs.
_BEFORE_A_RUN = ("STOP", "logs", LOCK_NAME)


def is_distvit_run(run_dir: Path) -> bool:
    """The folder holds a distvit run: its record, or (runs from before the record) a config and a log."""
    if (run_dir / RUN_RECORD).is_file():
        return True
    return (run_dir / CONFIG_NAME).is_file() and (
        (run_dir / METRICS_NAME).is_file() or (run_dir / CHECKPOINT_DIR / "latest.json").is_file()
    )


def _other_entries(run_dir: Path) -> list[str]:
    """What the folder holds besides what may be there before a run starts."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in _BEFORE_A_RUN)


def run_folder(cfg: RunConfig) -> Path:
    return Path(cfg.dir)


def check_run_dir(cfg: RunConfig, *, resume: str) -> Path:
    """Refuse to start a new run on top of an earlier one unless run.overwrite is set (or the run resumes:
    `resume` is train.resume), and make sure the directory can be written. Every rank calls this before
    training starts; rank 0 writes nothing until all ranks have passed it (see engine.run_training)."""
    run_dir = run_folder(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.dir!r} is a file; it must be a directory (it is created if missing).")
    others = _other_entries(run_dir)
    if others and not is_distvit_run(run_dir):
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ConfigError(
            f"run.dir={cfg.dir!r} is not empty ({shown}) and holds no distvit run: distvit writes runs only "
            "into a new or empty folder, and replaces files only in its own runs' folders. Choose another run.dir."
        )
    _check_resume_source(cfg, resume, run_dir, others)
    if (run_dir / CONFIG_NAME).exists() and not (cfg.overwrite or resume):
        raise ConfigError(
            f"run.dir={cfg.dir!r} already holds a run ({CONFIG_NAME} exists). Continue it with "
            f"train.resume=auto, choose another run.dir, or pass run.overwrite=true to replace its results."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.dir={cfg.dir!r} cannot be created ({err.strerror}). Choose another run.dir.") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={cfg.dir!r} is not writable by this user. Choose another run.dir.")
    return run_dir


_HELD_LOCKS: dict[str, Any] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Rank 0 holds an exclusive lock on the run folder for the rest of the process (released when it
    ends, however it ends): a second run started in the same folder is refused, naming the first one's
    process and host, before it changes anything. (Trainers of one process share the lock.)"""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _HELD_LOCKS:
        return
    handle = hold_lock(run_dir / LOCK_NAME)
    if handle is None:
        raise ConfigError(
            f"run.dir={str(run_dir)!r} is in use by another distvit run ({lock_holder(run_dir / LOCK_NAME)}): wait "
            "for it to end, or choose another run.dir."
        )
    _HELD_LOCKS[key] = handle


def _check_resume_source(cfg: RunConfig, source: str, run_dir: Path, others: list[str]) -> None:
    """Resuming from another run's checkpoint (`source`: train.resume) starts a new run: only in a new or
    empty folder (it would otherwise mix with, and drop the summary and logs of, the run already there)."""
    if source in ("", "auto") or not others:
        return
    resolved, home = Path(source).resolve(), run_dir.resolve()
    if home != resolved and home not in resolved.parents:
        raise ConfigError(
            f"train.resume={source!r} is another run's checkpoint, and run.dir={cfg.dir!r} already holds a "
            "run: resume from another run into a new or empty run.dir (train.resume=auto continues the run there)."
        )


def init_run_dir(run_dir: Path, cfg: RunConfig, *, resume: str, config_yaml: str, resumed_step: int | None) -> None:
    """Main process only. Marks the folder as a run's (RUN_RECORD) before anything else. A new run clears
    an earlier run's results (run.overwrite, or `resume` (train.resume) auto finding no checkpoint): only
    the files a run writes; a resumed run drops what was logged after its checkpoint. Then the resolved
    config (`config_yaml`) is written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_RECORD).is_file():
        record = {"distvit_run": 1, "created": datetime.datetime.now().isoformat(timespec="seconds")}
        record["host"] = socket.gethostname()
        atomic_write_bytes(run_dir / RUN_RECORD, (json.dumps(record) + "\n").encode())
    if resumed_step is None:
        if cfg.overwrite or resume:
            for name in _RUN_FILES:
                # resume=auto before the first checkpoint (a requeued job) is the same run: same W&B run
                if not (name == TRACKER_NAME and resume):
                    (run_dir / name).unlink(missing_ok=True)
            for folder, owned in _RUN_FOLDERS.items():
                if not (folder == WANDB_DIR and resume):
                    _remove_owned(run_dir / folder, owned)
    else:
        (run_dir / SUMMARY_NAME).unlink(missing_ok=True)
        (run_dir / STOPPED_NAME).unlink(missing_ok=True)
        logs = [run_dir / METRICS_NAME, *sorted((run_dir / TRACE_DIR).glob("*.jsonl"))]
        for log in logs:
            _drop_lines_after(log, resumed_step)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CONFIG_NAME, config_yaml.encode())


def _remove_owned(folder: Path, owned: re.Pattern) -> None:
    """Delete the run's own entries of `folder` (W&B's run folders whole), then the folder if that
    leaves it empty; a user's files there stay."""
    import shutil

    if not folder.is_dir() or folder.is_symlink():
        return
    for entry in folder.iterdir():
        if not owned.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


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
