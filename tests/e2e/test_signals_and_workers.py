"""Signals and loader workers end to end, on 2 gloo ranks streaming with 2 loader workers each: SIGTERM or
SIGINT to the launcher's process group (what scancel, the torchrun agent and a terminal's Ctrl-C do) is a
checkpointed stop at one step, also during start-up (one line, nothing to checkpoint); a loader worker
killed on one rank (the OOM killer) is one error on every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distvit.run.checkpoint_files import load_checkpoint
from distvit.run.plots import read_metrics_lines
from distvit.run.rundir import read_summary
from tests.support.helpers import REPO, accelerate_launch, launcher_command, subprocess_env, wait_for_lines, worker_pids

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RECORD_EXIT = REPO / "tests" / "support" / "scripts" / "record_exit.py"
START_UP_LINE = (
    "distvit: stopped by SIGTERM during start-up, before its first step; nothing new to checkpoint; continue "
    "with train.resume=auto."
)


def stream_args(dataset, run_dir: Path, epochs: int) -> list[str]:
    return [
        "--config",
        "configs/demo.yaml",
        f"data.path={dataset}",
        f"run.dir={run_dir}",
        "data.mode=stream",
        "data.num_workers=2",
        "data.trace_samples=true",
        f"train.epochs={epochs}",
        "train.batch_size=8",  # 25 steps an epoch: more than the workers keep in flight (8 batches)
        "train.log_every=1",
        "checkpoint.stop_check_every=2",
        "tracking.backend=none",
    ]


def start(args: list[str], exits: Path) -> subprocess.Popen:
    """The launcher in a session of its own (as a batch job's or a terminal's process group)."""
    exits.mkdir()
    return subprocess.Popen(
        launcher_command(2, args, script=RECORD_EXIT),
        cwd=REPO,
        env={**subprocess_env(), "DISTVIT_TEST_EXIT_DIR": str(exits)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def ranks_of(process: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} under the launcher, remembered for `kill_all`."""
    ranks = worker_pids(process.pid)
    process.ranks_seen = {**getattr(process, "ranks_seen", {}), **ranks}
    return ranks


def kill_all(process: subprocess.Popen) -> None:
    """A failed check leaves nothing running: the ranks (sessions of their own, outliving a launcher that
    gave up on them) and their loader workers, while they are still this test's processes."""
    for rank in getattr(process, "ranks_seen", {}).values():
        for pid in [*loader_workers_of(rank), rank]:
            try:
                if str(RECORD_EXIT) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
    process.kill()


def rank_statuses(exits: Path) -> dict[str, int]:
    return {path.name: int(path.read_text()) for path in sorted(exits.iterdir())}


def loader_workers_of(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in children.split()]


def last_traced_steps(run_dir: Path) -> list[int]:
    return [read_metrics_lines(path)[-1]["step"] for path in sorted((run_dir / "trace").glob("rank*.jsonl"))]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launchers_group_stops_every_rank_at_one_step_with_a_checkpoint(
    small_dataset, tmp_path, signum
):
    """The agent passes the signal on to each rank's process group, loader workers included: they outlive
    it, every rank checkpoints at the agreed step and exits 3, and the run resumes to its end."""
    run_dir = tmp_path / "run"
    args = stream_args(small_dataset, run_dir, epochs=2)
    process = start(args, tmp_path / "exits")
    try:
        wait_for_lines(run_dir / "metrics.jsonl", 3, process=process)
        ranks = ranks_of(process)
        assert all(len(loader_workers_of(pid)) == 2 for pid in ranks.values())  # streaming, mid-epoch
        os.killpg(process.pid, signum)
        out, err = process.communicate(timeout=120)
    finally:
        kill_all(process)
    # accelerate's own status (128 + the signal), once its agent has seen the ranks out; no traceback
    assert process.returncode == 128 + signum, err[-3000:]
    assert rank_statuses(tmp_path / "exits") == {"rank0": 3, "rank1": 3}, err[-3000:]
    stopped = json.loads((run_dir / "stopped.json").read_text())
    step = stopped["step"]
    assert stopped["reason"] == signal.Signals(signum).name and step % 2 == 0 and step < 50, stopped
    assert last_traced_steps(run_dir) == [step, step]  # both ranks stopped after the same step
    assert load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")["step"] == step
    assert f"distvit: stopped after step {step} ({signal.Signals(signum).name}); checkpoint " in out
    assert "Traceback" not in err and "DataLoader worker" not in err and "KeyboardInterrupt" not in err
    if signum == signal.SIGINT:
        return
    resumed = accelerate_launch(2, [*args, "train.resume=auto"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout and read_summary(run_dir)["steps"] == 2 * 25


def test_sigterm_during_start_up_is_one_line_and_leaves_the_run_directory_untouched(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    process = start(stream_args(small_dataset, run_dir, epochs=1), tmp_path / "exits")
    try:
        deadline = time.monotonic() + 60
        while not (ranks := ranks_of(process)).keys() == {0, 1} or not all(map(catches_sigterm, ranks.values())):
            assert time.monotonic() < deadline and process.poll() is None, "the ranks did not start"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGTERM)  # the ranks are still importing torch
        out, err = process.communicate(timeout=120)
    finally:
        kill_all(process)
    assert rank_statuses(tmp_path / "exits") == {"rank0": 3, "rank1": 3}, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("distvit:")]
    assert lines == [START_UP_LINE], err[-3000:]  # once per node
    assert "Traceback" not in err and out == ""
    assert not run_dir.exists() or not any(run_dir.iterdir())


def catches_sigterm(pid: int) -> bool:
    """The process has a handler for SIGTERM (distvit's, installed first thing in distvit/train.py)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def test_a_loader_worker_killed_on_rank_1_stops_both_ranks_with_one_error(small_dataset, tmp_path):
    """As the OOM killer would: rank 1 reports it at the next point where the ranks agree, stepping on
    stand-in batches until then; every rank stops there with its message (exit 2), nobody hangs."""
    run_dir = tmp_path / "run"
    process = start(stream_args(small_dataset, run_dir, epochs=20), tmp_path / "exits")
    try:
        wait_for_lines(run_dir / "metrics.jsonl", 3, process=process)
        workers = loader_workers_of(ranks_of(process)[1])
        assert len(workers) == 2
        killed_at = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        out, err = process.communicate(timeout=120)
    finally:
        kill_all(process)
    assert time.monotonic() - killed_at < 30
    assert rank_statuses(tmp_path / "exits") == {"rank0": 2, "rank1": 2}, err[-3000:]
    errors = [line[line.index("distvit: error:") :] for line in err.splitlines() if "distvit: error:" in line]
    assert len(errors) == 1, err[-3000:]  # once per node, as every input error
    assert errors[0].startswith(f"distvit: error: loader worker 1 (pid {workers[1]}) was killed by SIGKILL while ")
    assert "OOM killer" in errors[0] and "data.num_workers (now 2)" in errors[0], errors[0]
    assert errors[0].endswith("(found by rank 1)"), errors[0]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err and "lost contact" not in err
