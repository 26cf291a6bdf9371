"""`distvit sweep`: workers side by side with the pruner, a killed worker's trial handed over, a seeded serial
sweep repeated, bad sweep files and foreign folders. Trials: configs/demo.yaml on the small synthetic set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distvit.run.rundir import is_distvit_run
from tests.support.helpers import REPO, run_cli, subprocess_env
from tests.support.sweeps import folder_snapshot, summary, trial_states, write_sweep

pytestmark = pytest.mark.slow


def _worker(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distvit.cli", "sweep", "run", *args],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(worker: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, out[-4000:]
    return out


def _trial_params(sweep_dir):
    from distvit.sweep.folder import load_sweep
    from distvit.sweep.study import SweepStudy

    return [trial.params for trial in SweepStudy(load_sweep(sweep_dir)).trials()]


def test_two_workers_run_a_sweep_with_the_pruner(small_dataset, tmp_path):
    space = {"optim.lr": {"loguniform": [1.0e-5, 3.0e-3]}, "augment.preset": {"choice": ["none", "crop_flip"]}}
    pruner = {"type": "asha", "min_epochs": 1, "reduction_factor": 3}
    path = write_sweep(tmp_path, small_dataset, space=space, trials=6, pruner=pruner)
    sweep_dir = tmp_path / "t-sweep"
    workers = [_worker([str(path)]) for _ in range(2)]
    outputs = [_finish(worker) for worker in workers]
    assert all("6 of 6 trials finished" in out for out in outputs), outputs

    states = trial_states(sweep_dir)
    assert sorted(states) == list(range(6)) and set(states.values()) <= {"COMPLETE", "PRUNED"}, states
    pruned = [n for n, state in states.items() if state == "PRUNED"]
    assert pruned, states
    from distvit.sweep.folder import load_sweep
    from distvit.sweep.study import SweepStudy

    trials = SweepStudy(load_sweep(sweep_dir)).trials()
    for trial in trials:
        run_dir = sweep_dir / "trials" / f"{trial.number:04d}"
        assert is_distvit_run(run_dir) and (run_dir / "config.yaml").is_file()
        result = summary(run_dir)
        if trial.state.name == "COMPLETE":
            assert result["finished"] and result["epochs"] == 3 and trial.value == result["final"]["loss"]
        else:  # the rule: worse than a trial that reached the same epoch (ASHA's first rung keeps the best)
            assert not result["finished"] and result["stop_reason"].startswith("pruned by the sweep: loss ")
            epoch = max(trial.intermediate_values)
            mine = trial.intermediate_values[epoch]
            assert any(other.intermediate_values.get(epoch, mine) < mine for other in trials), trial
            assert (run_dir / "checkpoints" / "latest.json").is_file()
    assert os.listdir(sweep_dir / "claims") == []

    report = run_cli(["sweep", "report", str(sweep_dir)])
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line[:4].isdigit() and line[4:6] == "  "]
    assert [row.split()[0] for row in rows] == [f"{n:04d}" for n in range(6)]
    assert report.stdout.count("PRUNED") == len(pruned) + 1  # the rows, and the count line
    for name in ("objective.png", "params.png", "trials.csv", "trials.txt"):
        assert (sweep_dir / "report" / name).stat().st_size > 0
    # A pruned trial is an ordinary run: evaluate its checkpoint.
    checkpoint = max((sweep_dir / "trials" / f"{pruned[0]:04d}" / "checkpoints").glob("*.pt"), key=os.path.getmtime)
    evaluated = run_cli(["evaluate", str(checkpoint)])
    assert evaluated.returncode == 0 and "accuracy" in evaluated.stdout, evaluated.stderr
    best_run = tmp_path / "best-run"
    trained = run_cli(["train", "--config", str(sweep_dir / "best.yaml"), f"run.dir={best_run}", "train.epochs=1"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert summary(best_run)["finished"]


def _wait_for_evaluation(run_dir, worker, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and '"split": "test"' in (run_dir / "metrics.jsonl").read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no evaluation in {run_dir}: {worker.poll()}")


def test_a_killed_workers_trial_is_handed_over_and_counted_once(small_dataset, tmp_path):
    path = write_sweep(tmp_path, small_dataset, trials=1, heartbeat_timeout_s=3, overrides={"train.epochs": 4})
    sweep_dir = tmp_path / "t-sweep"
    run_dir = sweep_dir / "trials" / "0000"
    first = _worker([str(path)])
    _wait_for_evaluation(run_dir, first)
    first.send_signal(signal.SIGKILL)  # no requeue, no goodbye; its run gets SIGTERM (checkpoint and stop)
    first.wait()
    second = _worker([str(sweep_dir)])
    out = _finish(second)
    assert "taking over trial 0000" in out and "1 of 1 trials finished" in out, out
    assert trial_states(sweep_dir) == {0: "COMPLETE"}
    result = summary(run_dir)
    assert result["finished"] and result["epochs"] == 4
    log = (run_dir / "logs" / "train.log").read_text()
    assert log.count("=== ") == 4 and "trial 0 resumed by" in log, log  # two attempts, each with its command
    from distvit.sweep.trial import evaluations

    assert sorted(evaluations(run_dir, "test", "loss")) == [1, 2, 3, 4]
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split": "test"' in line]
    assert len(lines) == 4  # each evaluation once: the resumed run dropped what came after its checkpoint
    assert os.listdir(sweep_dir / "claims") == []


def test_a_serial_sweep_with_a_seed_suggests_the_same_parameters_twice(small_dataset, tmp_path):
    fast = {"train.epochs": 1, "data.train_subset": 64}
    params = []
    for name in ("a", "b"):
        path = write_sweep(tmp_path, small_dataset, name=name, trials=2, overrides=fast, sampler={"seed": 11})
        _finish(_worker([str(path)]))
        params.append(_trial_params(tmp_path / f"{name}-sweep"))
    assert params[0] == params[1] and len(params[0]) == 2 and params[0][0] != params[0][1]


def test_bad_sweep_files_and_foreign_folders_give_one_error_and_change_nothing(small_dataset, tmp_path):
    bad = write_sweep(tmp_path, small_dataset, space={"optim.lr": {"uniform": [0.3, 0.1]}})
    result = run_cli(["sweep", "run", str(bad)])
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "uniform" in text)
    assert result.returncode == 2 and result.stdout == ""
    message = f"{bad}, line {line}: space.optim.lr: uniform range [0.3, 0.1] is empty (low must be < high)."
    assert result.stderr == f"distvit: error: {message}\n"
    assert not (tmp_path / "t-sweep").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2\n")
    good = write_sweep(tmp_path, small_dataset)
    for args in (["--dir", str(foreign), str(good)], [str(foreign)]):
        result = run_cli(["sweep", "run", *args])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("distvit: error: ") and str(foreign) in result.stderr
    report = run_cli(["sweep", "report", str(foreign)])
    assert report.returncode == 2 and "is not a distvit sweep folder" in report.stderr
    assert folder_snapshot(foreign) == {"data.csv": b"1,2\n"}


@pytest.mark.slurm
def test_a_slurm_array_runs_a_sweep_and_a_requeued_task_resumes_its_trial(slurm_cluster, small_dataset, tmp_path):
    """slurm/sweep.sbatch as a 2-task array on the local cluster, 4 trials; USR1 to task 0's batch shell in the
    middle of a trial: it checkpoints, the task requeues itself and resumes that same trial."""
    from distvit.sweep.claims import read_claims

    path = write_sweep(tmp_path, small_dataset, trials=4, heartbeat_timeout_s=300, overrides={"train.epochs": 6})
    sweep_dir = tmp_path / "t-sweep"
    env = slurm_cluster.env({**subprocess_env(), "DISTVIT_PYTHON": sys.executable})
    out = tmp_path / "out"
    out.mkdir()
    job = slurm_cluster.sbatch(
        ["--array=0-1", "--ntasks-per-node=1", f"--output={out}/%A_%a.out", "slurm/sweep.sbatch", str(path)],
        cwd=REPO,
        env=env,
    )
    deadline = time.monotonic() + 240
    trial = None
    while trial is None and time.monotonic() < deadline:  # task 0's first trial, once it evaluated
        for number, claim in read_claims(sweep_dir / "claims").items():
            metrics = sweep_dir / "trials" / f"{number:04d}" / "metrics.jsonl"
            if claim.key == f"slurm:{job}_0" and metrics.is_file() and '"split": "test"' in metrics.read_text():
                trial = number
        time.sleep(0.2)
    assert trial is not None, slurm_cluster.queue()
    slurm_cluster.scancel(["--signal=USR1", "--batch", f"{job}_0"])
    logs = lambda: "\n".join(p.read_text()[-3000:] for p in sorted(out.glob("*.out")))  # noqa: E731
    for task in (0, 1):
        assert slurm_cluster.wait(f"{job}_{task}", timeout=600) == "COMPLETED", logs()
    assert slurm_cluster.job_info(f"{job}_0")["Restarts"] == "1", logs()
    assert trial_states(sweep_dir) == {n: "COMPLETE" for n in range(4)}, logs()
    run_dir = sweep_dir / "trials" / f"{trial:04d}"
    log = (run_dir / "logs" / "train.log").read_text()
    assert f"trial {trial} started by" in log and f"trial {trial} resumed by" in log, log
    assert log.count(f"'slurm': '{job}_0'") == 2 and summary(run_dir)["epochs"] == 6, log
    assert "stopped at a checkpoint; it resumes with this worker's requeue" in logs()
