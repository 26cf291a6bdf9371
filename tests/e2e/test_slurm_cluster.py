"""A real local Slurm cluster (tests/support/slurm_cluster.py): multi-node srun, requeue, signals to the batch shell.

Skipped where Slurm cannot run (not installed, not root) -- except under CI=true, where that is a failure:
CI installs Slurm with .ci/install-slurm.sh and must really test it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.slurm_cluster import LocalCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture
def cluster(slurm_cluster):
    return slurm_cluster


def _wait_for(path: Path, timeout: float, cluster: LocalCluster, job_id: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written after {timeout:.0f} s; job {cluster.job_info(job_id)}")
        time.sleep(0.1)


def test_srun_places_one_task_per_node(cluster):
    out = cluster.run(
        ["srun", "-N2", "-n2", "bash", "-c", "echo $SLURM_NODEID $SLURM_PROCID $SLURMD_NODENAME"], timeout=30
    ).stdout
    assert sorted(out.split("\n")[:-1]) == ["0 0 n1", "1 1 n2"], out
    # Two tasks on one node fit as well (CPUs=2 per node).
    out = cluster.run(["srun", "-N1", "-n2", "bash", "-c", "echo $SLURM_NODEID $SLURM_PROCID"], timeout=30).stdout
    assert sorted(out.split("\n")[:-1]) == ["0 0", "0 1"], out


def test_sbatch_requeue_restarts_the_job(cluster, tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text("""#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=job.out
echo "run restart=${SLURM_RESTART_COUNT:-0} node=$SLURMD_NODENAME"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60    # the requeue ends this run
    exit 3
fi
echo "$SLURM_RESTART_COUNT" > second_run
""")
    job = cluster.sbatch([str(script)], cwd=tmp_path)
    assert cluster.wait(job, timeout=45) == "COMPLETED", (cluster.job_info(job), (tmp_path / "job.out").read_text())
    info = cluster.job_info(job)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert (tmp_path / "second_run").read_text().strip() == "1"
    runs = [line.split()[1] for line in (tmp_path / "job.out").read_text().splitlines() if line.startswith("run ")]
    assert runs == ["restart=0", "restart=1"], (tmp_path / "job.out").read_text()


def test_scancel_signal_reaches_batch_shell_trap(cluster, tmp_path):
    script = tmp_path / "trap.sh"
    script.write_text("""#!/bin/bash
#SBATCH --output=job.out
trap 'echo "USR1 in $SLURM_JOB_ID" > got_usr1; exit 0' USR1
touch ready
for _ in $(seq 120); do sleep 1 & wait $!; done   # `wait` returns at once on a trapped signal
exit 4
""")
    job = cluster.sbatch([str(script)], cwd=tmp_path)
    _wait_for(tmp_path / "ready", 30, cluster, job)
    cluster.scancel(["--signal=USR1", "--batch", job])
    assert cluster.wait(job, timeout=30) == "COMPLETED", (cluster.job_info(job), (tmp_path / "job.out").read_text())
    assert (tmp_path / "got_usr1").read_text().strip() == f"USR1 in {job}"
