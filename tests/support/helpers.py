"""Helpers for tests that run distvit in subprocesses (CLI, accelerate launch)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from distvit.run.plots import read_metrics_lines

REPO = Path(__file__).resolve().parents[2]  # tests/support/helpers.py


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("WANDB_SILENT", "true")
    env.pop("WANDB_API_KEY", None)
    return env


def launcher_command(
    num_processes: int,
    args: list[str],
    script: Path | None = REPO / "distvit" / "train.py",
    monitor_interval: float | None = None,
) -> list[str]:
    """`accelerate launch` on CPU (2+ processes use gloo, MULTI_CPU); script None: args start with -m module.

    `monitor_interval`: how often the launcher's agent looks at its ranks. It SIGTERMs the others as soon as it
    sees one exit, so a test asserting every rank's own exit status gives them this long to exit by themselves."""
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(num_processes),
    ]
    launcher += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    launcher += ["--main_process_port", str(29500 + os.getpid() % 2000)] if num_processes > 1 else []
    launcher += ["--monitor_interval", str(monitor_interval)] if monitor_interval is not None else []
    return launcher + ([str(script)] if script else []) + list(args)


def accelerate_launch(
    num_processes: int,
    args: list[str],
    timeout: float = 600,
    script: Path | None = REPO / "distvit" / "train.py",
    monitor_interval: float | None = None,
) -> subprocess.CompletedProcess:
    """Run `launcher_command` to completion (distvit/train.py by default)."""
    command = launcher_command(num_processes, args, script, monitor_interval)
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distvit.cli", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for_lines(path: Path, lines: int, timeout: float = 300, process: subprocess.Popen | None = None) -> None:
    """Wait until `path` (a run's metrics.jsonl) has `lines` lines; fail early if `process` ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and (process is None or process.poll() is None):
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)
    detail = process.communicate()[1][-2000:] if process is not None and process.poll() is not None else ""
    raise AssertionError(f"{path} did not reach {lines} lines. {detail}")


def launch_until_logged(num_processes: int, args: list[str], run_dir: Path, lines: int = 3) -> subprocess.Popen:
    """Start a training run with `launcher_command` and return once it has logged `lines` metrics lines."""
    process = subprocess.Popen(
        launcher_command(num_processes, args),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_lines(run_dir / "metrics.jsonl", lines, process=process)
    except AssertionError:
        process.kill()
        raise
    return process


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under an accelerate launcher."""
    ranks = {}
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True).stdout
    for child in children.split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks.update({int(e[5:]): int(child) for e in environ if e.startswith(b"RANK=")})
    return ranks


def launch_ok(num_processes, args):
    result = accelerate_launch(num_processes, args)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def trace_ids(run_dir):
    """{epoch: [sample ids trained on, all ranks]} from data.trace_samples."""
    ids = {}
    for path in sorted((run_dir / "trace").glob("rank*.jsonl")):
        for record in read_metrics_lines(path):
            ids.setdefault(record["epoch"], []).extend(record["ids"])
    return ids
