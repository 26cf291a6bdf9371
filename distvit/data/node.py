"""This process's place on its node, and what the node has: the facts the data layer, the engine and the
tools size themselves by (loader workers, threads, hashing, memory mode)."""

from __future__ import annotations

import os
from pathlib import Path


def local_ranks() -> tuple[int, int]:
    """(this process's local rank, the number of ranks on this node), as the launcher set them."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def session_id() -> str:
    """Shared by the local ranks of one launch (their parent is the launcher), unique per launch."""
    return str(os.getppid() if "LOCAL_RANK" in os.environ else os.getpid())


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
