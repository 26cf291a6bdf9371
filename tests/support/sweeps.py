"""Sweep files for tests: the demo config on a small synthetic dataset, trials of seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.support.helpers import REPO

FAST = {
    "tracking.backend": "none",
    "train.batch_size": 32,
    "train.epochs": 3,
    "train.log_every": 1,
    "train.cpu_threads": 1,
    "eval.batch_size": 101,
    "augment.preset": "none",
    "checkpoint.every_epochs": 1,
    "checkpoint.export": False,
}
"""Base-config overrides that make a trial on `small_dataset` take seconds."""


def write_sweep(
    folder: Path, dataset: Path | None, *, name: str = "t", overrides: dict[str, Any] | None = None, **fields: Any
) -> Path:
    """folder/NAME.yaml: a sweep of configs/demo.yaml on `dataset` into folder/NAME-sweep; `fields` replace
    the sweep file's own (space, trials, pruner, ...), `overrides` add to the base config's."""
    body: dict[str, Any] = {
        "name": name,
        "config": str(REPO / "configs" / "demo.yaml"),
        "dir": str(folder / f"{name}-sweep"),
        "overrides": {**({"data.path": str(dataset)} if dataset else {}), **FAST, **(overrides or {})},
        "space": {"optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}},
        "objective": {"metric": "loss", "direction": "minimize"},
        "trials": 2,
        "pruner": "none",
        "sampler": {"seed": 0},
        "heartbeat_timeout_s": 30,
    }
    body.update(fields)
    searched = set(body["space"]) if isinstance(body["space"], dict) else set()
    body["overrides"] = {k: v for k, v in body["overrides"].items() if k not in searched}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def trial_states(sweep_dir: Path) -> dict[int, str]:
    """{trial number: Optuna state name} read from the sweep's journal."""
    from distvit.sweep.folder import load_sweep
    from distvit.sweep.study import SweepStudy

    return SweepStudy(load_sweep(sweep_dir)).states()


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (what "changes nothing" compares)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())
