"""Memory mode on a node whose shared memory is too small (a container's 64 MB /dev/shm in miniature): the
node's first rank decides, says so once, and the ranks train on private copies instead of failing."""

from __future__ import annotations

import subprocess

import pytest

from distvit.run.rundir import read_summary
from tests.support.disks import small_tmpfs
from tests.support.helpers import REPO, launcher_command, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_ranks_fall_back_to_private_copies_with_one_note(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    with small_tmpfs(tmp_path / "shm", 1) as shm:
        (shm / "someone-elses").write_bytes(b"x" * 600 * 1024)  # ~0.4 MiB left; the train split needs ~0.6
        result = subprocess.run(
            launcher_command(
                2,
                [
                    "--config",
                    "configs/demo.yaml",
                    f"data.path={small_dataset}",
                    f"run.dir={run_dir}",
                    "data.mode=memory",
                    "train.epochs=1",
                    "train.batch_size=50",
                    "tracking.backend=none",
                ],
            ),
            cwd=REPO,
            env={**subprocess_env(), "DISTVIT_SHARED_MEMORY": str(shm)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        notes = [line for line in result.stderr.splitlines() if line.startswith("distvit: note:")]
        assert len(notes) == 1 and "too little for the node's 2 ranks to share split 'train'" in notes[0], notes
        assert "each rank decodes its own copy in private memory (2 x 0.6 MiB)" in notes[0]
        leftovers = sorted(p.name.rsplit(".", 1)[-1] for p in shm.glob("distvit-*"))
        assert leftovers == [], leftovers  # the test split was shared there, and removed at the end
    assert read_summary(run_dir)["steps"] == 4
