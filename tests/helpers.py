"""Helpers for tests that run distvit in subprocesses (CLI, accelerate launch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("WANDB_SILENT", "true")
    env.pop("WANDB_API_KEY", None)
    return env


def launcher_command(num_processes: int, args: list[str], script: Path | None = REPO / "distvit" / "train.py") -> list[str]:
    """`accelerate launch` on CPU (2+ processes use gloo, MULTI_CPU); script None: args start with -m module."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", str(num_processes)]
    launcher += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    launcher += ["--main_process_port", str(29500 + os.getpid() % 2000)] if num_processes > 1 else []
    return launcher + ([str(script)] if script else []) + list(args)


def accelerate_launch(
    num_processes: int, args: list[str], timeout: float = 600, script: Path | None = REPO / "distvit" / "train.py",
) -> subprocess.CompletedProcess:
    """Run `launcher_command` to completion (distvit/train.py by default)."""
    command = launcher_command(num_processes, args, script)
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distvit.cli", *args], cwd=REPO, env=subprocess_env(),
        capture_output=True, text=True, timeout=timeout,
    )
