"""The run directory: reuse rules and what an overwrite removes."""

from __future__ import annotations

import pytest

from distvit.config import load_config
from distvit.errors import ConfigError
from distvit.rundir import check_run_dir, init_run_dir


def test_overwrite_clears_previous_results(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    for name in ("checkpoints", "wandb/offline-run-1"):
        (run_dir / name).mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/final.pt", "notes.txt"):
        (run_dir / name).write_text("old")
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={run_dir}"])
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(cfg)
    cfg.run.overwrite = True
    check_run_dir(cfg)
    init_run_dir(run_dir, cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "notes.txt"]  # the user's own file stays
    assert load_config(run_dir / "config.yaml") == cfg


def test_run_dir_that_cannot_be_created(small_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={blocker}/run"])
    with pytest.raises(ConfigError, match="cannot be created"):
        check_run_dir(cfg)
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={blocker}"])
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(cfg)
