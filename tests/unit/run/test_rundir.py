"""The run directory: reuse rules and what an overwrite removes."""

from __future__ import annotations

import json

import pytest

from distvit.config import load_config
from distvit.errors import ConfigError
from distvit.run.rundir import check_run_dir, init_run_dir


def test_overwrite_clears_previous_results(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    for name in ("checkpoints", "wandb/offline-run-1", "trace"):
        (run_dir / name).mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/final.pt", "notes.txt"):
        (run_dir / name).write_text("old")
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={run_dir}"])
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(cfg)
    cfg.run.overwrite = True
    check_run_dir(cfg)
    init_run_dir(run_dir, cfg, resumed_step=None)
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


def test_resumed_run_drops_lines_logged_after_its_checkpoint(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "trace").mkdir(parents=True)
    lines = "".join(f'{{"split": "train", "step": {s}}}\n' for s in range(1, 8))
    (run_dir / "metrics.jsonl").write_text(lines)
    (run_dir / "trace" / "rank0.jsonl").write_text(lines)
    (run_dir / "summary.json").write_text("{}")
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={run_dir}", "train.resume=auto"])
    init_run_dir(run_dir, cfg, resumed_step=4)
    for log in ("metrics.jsonl", "trace/rank0.jsonl"):
        assert [json.loads(x)["step"] for x in (run_dir / log).read_text().splitlines()] == [1, 2, 3, 4]
    assert not (run_dir / "summary.json").exists()
