"""distvit's Slurm scripts on a real local Slurm (tests/support/slurm_cluster.py: nodes n1 and n2 on this host):
one node x 2 processes, 2 nodes x 1 process, preemption with requeue and exact resume, doctor."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from distvit.run.checkpoint_files import load_checkpoint
from distvit.run.rundir import read_summary
from distvit.run.tracking import read_metrics
from tests.support.helpers import REPO, accelerate_launch, subprocess_env, wait_for_lines

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
OUTPUTS = Path(tempfile.mkdtemp(prefix="distvit-slurm-jobs-"))


def submit(cluster, script: str, options: list[str], args: list[str], env: dict[str, str] | None = None) -> str:
    """sbatch from the repository root; the batch output goes to OUTPUTS/<job>.out (job ids restart with
    every test cluster, so a shared folder would mix sessions)."""
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(
        [*options, f"--output={OUTPUTS}/%j.out", f"slurm/{script}", *args],
        cwd=REPO,
        env=cluster.env({**subprocess_env(), **(env or {})}),
    )


def finished(cluster, job: str, timeout: float) -> dict[str, str]:
    state = cluster.wait(job, timeout=timeout)
    info = cluster.job_info(job)
    output = OUTPUTS / f"{job}.out"
    log = output.read_text()[-3000:] if output.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job}: {state} {info}\n{log}"
    return info


def test_single_node_script_runs_the_demo_with_two_processes(slurm_cluster, demo_dataset, tmp_path):
    run_dir = tmp_path / "single"
    job = submit(
        slurm_cluster,
        "single_node.sbatch",
        ["-N1", "--ntasks-per-node=2"],
        [
            "configs/demo.yaml",
            f"data.path={demo_dataset}",
            f"run.dir={run_dir}",
            "train.epochs=2",
            "tracking.backend=none",
        ],
    )
    finished(slurm_cluster, job, timeout=600)
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"
    assert summary["steps"] == 2 * 79 and summary["final"]["num_samples"] == 1000


def test_multi_node_script_runs_two_nodes_by_one_process(slurm_cluster, small_dataset, tmp_path):
    run_dir = tmp_path / "multi"
    job = submit(
        slurm_cluster,
        "multi_node.sbatch",
        ["-N2", "--ntasks-per-node=1"],
        [
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.epochs=2",
            "train.batch_size=32",
            "tracking.backend=none",
        ],
    )
    info = finished(slurm_cluster, job, timeout=600)
    assert info["NodeList"] in ("n[1-2]", "n1,n2")
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2 and summary["steps"] == 2 * 7
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == [f"job{job}-node0.log", f"job{job}-node1.log"]  # machine rank expanded per node


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm_cluster, small_dataset, tmp_path):
    """USR1 to the batch shell mid-run: the ranks checkpoint at one step, the job requeues itself, resumes
    and finishes; every sample of every epoch trained on once, no step lost or repeated, the weights
    bit-equal to an uninterrupted run, the same W&B run id."""
    common = [
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        "train.epochs=6",
        "train.batch_size=32",
        "train.log_every=1",
        "checkpoint.stop_check_every=2",
        "data.trace_samples=true",
        "ema.enabled=true",
        "tracking.mode=offline",
        # The two Slurm "nodes" share this host, and each would take all its cores; the direct run's two
        # ranks share them: the same thread count on both sides keeps the float sums in the same order.
        "train.cpu_threads=1",
    ]
    run_dir = tmp_path / "preempted"
    job = submit(slurm_cluster, "multi_node.sbatch", ["-N2", "--ntasks-per-node=1"], [*common, f"run.dir={run_dir}"])
    wait_for_lines(run_dir / "metrics.jsonl", 4)
    slurm_cluster.scancel(["--signal=USR1", "--batch", job])
    info = finished(slurm_cluster, job, timeout=600)
    assert int(info.get("Restarts", info.get("RestartCnt", 0))) == 1

    train_steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert train_steps == list(range(1, 6 * 7 + 1))  # no step lost or logged twice
    for epoch in range(1, 7):
        ids = [
            i
            for path in (run_dir / "trace").glob("rank*.jsonl")
            for line in path.read_text().splitlines()
            if json.loads(line)["epoch"] == epoch
            for i in json.loads(line)["ids"]
        ]
        assert sorted(ids) == list(range(200)), f"epoch {epoch}"

    direct = accelerate_launch(2, ["--config", *common, f"run.dir={tmp_path}/direct", "tracking.backend=none"])
    assert direct.returncode == 0, direct.stderr[-2000:]
    a, b = load_checkpoint(tmp_path / "direct"), load_checkpoint(run_dir)
    for key in ("model", "ema"):
        assert max((a[key][k] - b[key][k]).abs().max().item() for k in a[key]) == 0.0, key
    run_id = json.loads((run_dir / "tracker.json").read_text())["wandb_run_id"]
    assert b["tracker"]["wandb_run_id"] == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # one per job run, one id


def test_doctor_passes_on_two_slurm_nodes(slurm_cluster, tmp_path):
    port = 21000 + int(time.time()) % 5000
    result = slurm_cluster.run(
        [
            "srun",
            "-N2",
            "-n2",
            "python3",
            "-m",
            "distvit.cli",
            "doctor",
            "--run-dir",
            str(tmp_path / "run"),
            "--rendezvous",
            f"n1:{port}",
            "--timeout",
            "60",
        ],
        timeout=180,
        check=False,
        cwd=REPO,
        env=slurm_cluster.env(subprocess_env()),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "distvit doctor: 2 rank(s)" in result.stdout and "all ranks OK" in result.stdout


def test_a_stop_file_stops_without_requeue(slurm_cluster, small_dataset, tmp_path):
    """The user's STOP (not Slurm's time-limit warning): checkpoint, stop, exit 3, no requeue."""
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    (run_dir / "STOP").touch()  # created before the job starts: still honoured (step 2, the first agreement)
    job = submit(
        slurm_cluster,
        "single_node.sbatch",
        ["-N1", "--ntasks-per-node=2"],
        [
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.batch_size=32",
            "checkpoint.stop_check_every=2",
            "tracking.backend=none",
        ],
    )
    assert slurm_cluster.wait(job, timeout=300) == "FAILED"
    info = slurm_cluster.job_info(job)
    assert info["ExitCode"].startswith("3:") and int(info.get("Restarts", 0)) == 0
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == 2
    assert not (run_dir / "STOP").exists()
    assert "not requeueing. Resubmit to continue" in (OUTPUTS / f"{job}.out").read_text()


def test_requeues_are_bounded(slurm_cluster, small_dataset, tmp_path):
    """DISTVIT_MAX_REQUEUES=0: the time-limit warning stops the run, which is then not requeued."""
    run_dir = tmp_path / "bounded"
    job = submit(
        slurm_cluster,
        "single_node.sbatch",
        ["-N1", "--ntasks-per-node=2"],
        [
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.batch_size=32",
            "train.log_every=1",
            "checkpoint.stop_check_every=2",
            "tracking.backend=none",
        ],
        env={"DISTVIT_MAX_REQUEUES": "0"},
    )
    wait_for_lines(run_dir / "metrics.jsonl", 3)
    slurm_cluster.scancel(["--signal=USR1", "--batch", job])
    assert slurm_cluster.wait(job, timeout=300) == "FAILED"
    info = slurm_cluster.job_info(job)
    assert info["ExitCode"].startswith("3:") and int(info.get("Restarts", 0)) == 0
    assert json.loads((run_dir / "stopped.json").read_text())["reason"] == "STOP file"
    output = (OUTPUTS / f"{job}.out").read_text()
    assert "got SIGUSR1" in output and "not requeueing: 0 requeue(s) reached DISTVIT_MAX_REQUEUES=0" in output


def test_scancel_on_one_node_checkpoints_without_requeue(slurm_cluster, small_dataset, tmp_path):
    """scancel (SIGTERM to the batch shell, the launcher and the ranks, as on preemption): the ranks
    agree on a step and checkpoint within Slurm's KillWait; the job is not requeued, and resubmitting
    continues from that checkpoint."""
    run_dir = tmp_path / "cancelled"
    args = [
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        f"run.dir={run_dir}",
        "train.batch_size=32",
        "train.log_every=1",
        "checkpoint.stop_check_every=2",
        "tracking.backend=none",
    ]
    job = submit(slurm_cluster, "single_node.sbatch", ["-N1", "--ntasks-per-node=2"], args)
    wait_for_lines(run_dir / "metrics.jsonl", 3)
    slurm_cluster.scancel([job])
    assert slurm_cluster.wait(job, timeout=120) == "CANCELLED"
    assert int(slurm_cluster.job_info(job).get("Restarts", 0)) == 0
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["reason"] in ("SIGTERM", "STOP file")
    assert load_checkpoint(run_dir / "checkpoints" / f"step_{stopped['step']:08d}.pt")["step"] == stopped["step"]
    again = submit(slurm_cluster, "single_node.sbatch", ["-N1", "--ntasks-per-node=2"], args)
    finished(slurm_cluster, again, timeout=300)
    assert read_summary(run_dir)["steps"] == 8 * 7
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == list(range(1, 8 * 7 + 1))
