"""Kills and full disks for real: SIGKILL at moments spread over a command's run, and a small tmpfs that
runs out of space (the kernel's ENOSPC). Each leaves the previous dataset or checkpoint usable, no
temporary file that the next command does not clean up (and say so), and at most one clear error line."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.read.shard_checks import find_bad_shards
from distvit.run.checkpoint_files import load_checkpoint
from distvit.run.rundir import read_summary
from tests.support.disks import resize_tmpfs, small_tmpfs
from tests.support.helpers import REPO, run_cli, subprocess_env

pytestmark = pytest.mark.slow


def _contents(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path: sha256), to compare byte for byte."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    """The error lines (a progress bar may share the line: the error starts mid-line)."""
    return [line[line.index("distvit: error:") :] for line in result.stderr.splitlines() if "distvit: error:" in line]


def _whole_dataset(folder: Path) -> int:
    """The number of shards the folder's manifest lists, after checking each one's size and sha256."""
    manifest = read_manifest(folder)
    assert find_bad_shards(folder, manifest, list(manifest.splits), "sha256") == {}
    return sum(len(split.shards) for split in manifest.splits.values())


def _prepare(out: Path, train_size: int, test_size: int = 101) -> list[str]:
    return [
        "prepare",
        "synthetic",
        "--out",
        str(out),
        "--train-size",
        str(train_size),
        "--test-size",
        str(test_size),
        "--samples-per-shard",
        "200",
    ]


def test_prepare_on_a_full_disk_keeps_the_old_dataset(tmp_path):
    with small_tmpfs(tmp_path / "disk", 3) as disk:
        out = disk / "data"
        assert run_cli(_prepare(out, 200)).returncode == 0  # 1.3 MB: fits
        (out / "my-notes.txt").write_text("the user's own file\n")
        before = _contents(out)
        result = run_cli(_prepare(out, 600))  # 2.6 MB more beside the old one: does not fit
        assert result.returncode == 2, result.stderr[-2000:]
        errors = _errors(result)
        assert len(errors) == 1 and "No space left on device" in errors[0] and " MB free there" in errors[0], errors
        assert "The folder's previous dataset, if any, is unchanged" in errors[0]
        assert "Traceback" not in result.stderr
        assert _contents(out) == before  # old shards, manifest and the user's file, byte for byte; no leftovers
        assert _whole_dataset(out) == 2


def test_training_on_a_full_disk_keeps_the_last_checkpoint_and_resumes_once_there_is_room(small_dataset, tmp_path):
    """A checkpoint is ~66 MB (deit_tiny with AdamW moments): a 100 MB disk holds one, not two."""
    with small_tmpfs(tmp_path / "disk", 100) as disk:
        run_dir = disk / "run"
        args = [
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.epochs=1",
            "train.batch_size=50",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=1",
            "checkpoint.keep_best=false",
            "tracking.backend=none",
        ]
        result = run_cli(args)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = _errors(result)
        assert len(errors) == 1, result.stderr[-2000:]
        assert f"writing {run_dir / 'checkpoints' / 'step_00000002.pt'} failed (" in errors[0], errors
        assert " MB free there. The previous checkpoint is intact" in errors[0], errors
        assert "Traceback" not in result.stderr
        checkpoints = run_dir / "checkpoints"
        latest = json.loads((checkpoints / "latest.json").read_text())
        assert latest["step"] == 1 and load_checkpoint(checkpoints / latest["file"])["step"] == 1
        assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step_00000001.pt"]  # no .tmp
        resize_tmpfs(disk, 400)  # the user frees space
        resumed = run_cli([*args, "train.resume=auto"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resumed from" in resumed.stdout + resumed.stderr
        summary = read_summary(run_dir)
        assert summary["finished"] and summary["steps"] == 4


def test_prepare_killed_at_any_moment_leaves_a_whole_dataset_and_the_next_one_cleans_up(tmp_path):
    """SIGKILL at moments spread over a prepare that replaces a dataset: afterwards the folder's manifest
    lists whole shards (the old dataset's or the new one's), the user's file is untouched, and what the
    killed prepare left is only its own staging folder or swap record, which the next prepare removes."""
    out = tmp_path / "data"
    assert run_cli(_prepare(out, 200)).returncode == 0
    (out / "train-backup-2024.tar").write_bytes(b"the user's own tar, under a shard-like name")
    user_file = _contents(out)["train-backup-2024.tar"]
    start = time.monotonic()  # how long a whole prepare of the new dataset takes here, start-up included
    assert run_cli(_prepare(tmp_path / "timing", 3000, 500)).returncode == 0
    duration = time.monotonic() - start
    killed_mid_write = 0
    for fraction in (0.55, 0.65, 0.75, 0.85, 0.95):
        delay = fraction * duration
        process = subprocess.Popen(
            [sys.executable, "-m", "distvit.cli", *_prepare(out, 3000, 500)],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        leftovers = {p.name for p in out.iterdir()} & {".distvit-prepare", ".distvit-prepare.json"}
        killed_mid_write += bool(leftovers)
        assert _whole_dataset(out) in (2, 18)  # the old dataset's 2 shards or the new one's 18, all whole
        assert _contents(out)["train-backup-2024.tar"] == user_file
        again = run_cli(_prepare(out, 200))
        assert again.returncode == 0, again.stderr[-2000:]
        if leftovers:
            notes = ("left by a prepare that did not finish", "a prepare was killed while swapping")
            assert any(note in again.stderr for note in notes), again.stderr
        listed = {
            shard["name"]
            for split in json.loads((out / "manifest.json").read_text())["splits"].values()
            for shard in split["shards"]
        }
        assert {p.name for p in out.iterdir()} == {"manifest.json", "train-backup-2024.tar", *listed}
    print(f"{killed_mid_write} of 5 kills landed while the new dataset was being written")
    assert killed_mid_write >= 2
