"""The run directory: reuse rules and what an overwrite removes."""

from __future__ import annotations

import json

import pytest

from distvit.config import load_config
from distvit.errors import ConfigError
from distvit.run.rundir import check_run_dir, init_run_dir


def _check(cfg):
    return check_run_dir(cfg.run, resume=cfg.train.resume)


def _init(run_dir, cfg, resumed_step):
    init_run_dir(run_dir, cfg.run, resume=cfg.train.resume, config_yaml=cfg.to_yaml(), resumed_step=resumed_step)


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_clears_previous_results_and_only_them(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    for name in ("checkpoints", "wandb/offline-run-1", "trace", "eval", "plots"):
        (run_dir / name).mkdir(parents=True)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/final.pt",
        "checkpoints/step_00000004.pt",
    ):
        (run_dir / name).write_text("old")
    for name in ("eval/confusion.json", "plots/loss.png", "trace/rank0.jsonl", "checkpoints/latest.json"):
        (run_dir / name).write_text("old")
    users = {"notes.txt": "mine", "eval/my_eval.csv": "a,b", "plots/figure1.png": "png", "checkpoints/keep.pt": "x"}
    for name, text in users.items():
        (run_dir / name).write_text(text)
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={run_dir}"])
    with pytest.raises(ConfigError, match="already holds a run"):
        _check(cfg)
    cfg.run.overwrite = True
    _check(cfg)
    _init(run_dir, cfg, None)
    # the run's own files went, the user's stayed byte for byte (and the folders holding them)
    assert _tree(run_dir) == sorted(
        ["checkpoints", "checkpoints/keep.pt", "config.yaml", "distvit-run.json", "eval", "eval/my_eval.csv"]
        + ["notes.txt", "plots", "plots/figure1.png"]
    )
    assert all((run_dir / name).read_text() == text for name, text in users.items())
    assert load_config(run_dir / "config.yaml") == cfg
    assert json.loads((run_dir / "distvit-run.json").read_text())["distvit_run"] == 1


@pytest.mark.parametrize("flag", ["run.overwrite=true", "train.resume=auto", "run.overwrite=false"])
def test_a_folder_that_holds_no_run_is_never_used(small_dataset, tmp_path, flag):
    """A user's folder (files, no distvit run): refused by every start, nothing in it touched."""
    folder = tmp_path / "experiments"
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "results.csv").write_text("mine")
    (folder / "paper.tex").write_text("mine")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={folder}", flag])
    with pytest.raises(
        ConfigError, match=r"is not empty \(eval, paper.tex\) and holds no distvit run: .*another run.dir"
    ):
        _check(cfg)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_folder_with_only_a_stop_file_or_slurm_logs_takes_a_new_run(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "job1-node0.log").write_text("starting")
    (run_dir / "STOP").touch()
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={run_dir}", "train.resume=auto"])
    assert _check(cfg) == run_dir
    _init(run_dir, cfg, None)
    assert (run_dir / "logs" / "job1-node0.log").read_text() == "starting" and (run_dir / "STOP").exists()


def test_resuming_from_another_runs_checkpoint_needs_a_new_or_empty_folder(small_dataset, tmp_path):
    finished = tmp_path / "finished"
    (finished / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/final.pt"):
        (finished / name).write_text("old")
    other = tmp_path / "other" / "checkpoints" / "step_00000010.pt"
    other.parent.mkdir(parents=True)
    other.write_text("a checkpoint")
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={finished}", f"train.resume={other}"])
    with pytest.raises(ConfigError, match=r"is another run's checkpoint, and run.dir=.* already holds a run"):
        _check(cfg)
    own = load_config(
        None, [f"data.path={small_dataset}", f"run.dir={finished}", f"train.resume={finished}/checkpoints/final.pt"]
    )
    assert _check(own) == finished  # its own checkpoint: the same run continues
    fresh = load_config(None, [f"data.path={small_dataset}", f"run.dir={tmp_path}/new", f"train.resume={other}"])
    assert _check(fresh) == tmp_path / "new"


def test_run_dir_that_cannot_be_created(small_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={blocker}/run"])
    with pytest.raises(ConfigError, match="cannot be created"):
        _check(cfg)
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={blocker}"])
    with pytest.raises(ConfigError, match="is a file"):
        _check(cfg)


def test_resumed_run_drops_lines_logged_after_its_checkpoint(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "trace").mkdir(parents=True)
    lines = "".join(f'{{"split": "train", "step": {s}}}\n' for s in range(1, 8))
    (run_dir / "metrics.jsonl").write_text(lines)
    (run_dir / "trace" / "rank0.jsonl").write_text(lines)
    (run_dir / "summary.json").write_text("{}")
    cfg = load_config(None, [f"data.path={small_dataset}", f"run.dir={run_dir}", "train.resume=auto"])
    _init(run_dir, cfg, 4)
    for log in ("metrics.jsonl", "trace/rank0.jsonl"):
        assert [json.loads(x)["step"] for x in (run_dir / log).read_text().splitlines()] == [1, 2, 3, 4]
    assert not (run_dir / "summary.json").exists()


def test_a_second_run_in_a_locked_folder_is_refused_naming_the_first(tmp_path):
    """The lock is held by the process that runs; another process asking for it gets a clear error
    naming that process and its host; once the first process ends, the folder is free again."""
    import socket
    import subprocess
    import sys

    from distvit.run.rundir import lock_run_dir
    from tests.support.helpers import REPO, subprocess_env

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from distvit.run.rundir import lock_run_dir; "
            f"lock_run_dir(pathlib.Path({str(run_dir)!r})); print('locked', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as err:
            lock_run_dir(run_dir)
        assert str(err.value).startswith(
            f"run.dir={str(run_dir)!r} is in use by another distvit run (pid {holder.pid} on {socket.gethostname()}, "
        )
        assert str(err.value).endswith("): wait for it to end, or choose another run.dir.")
    finally:
        holder.communicate("", timeout=30)
    lock_run_dir(run_dir)  # the first process ended: its lock went with it
    lock_run_dir(run_dir)  # and this process may ask again (its trainers share the lock)
