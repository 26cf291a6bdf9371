"""This process's place on its node, and what the node has: the facts the data layer, the engine and the
tools size themselves by (loader workers, threads, hashing, memory mode).

The launcher's environment (torchrun / accelerate launch: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
TORCHELASTIC_RESTART_COUNT, ACCELERATE_MIXED_PRECISION) is read here and nowhere else (`launch`), when
asked: a test or a tool may change it between calls. Only the standard library: the signal handlers of
the training entry point use it before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process. Started without one: rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False
    """A launcher started this process (LOCAL_RANK is set): its local ranks share that launcher."""
    restart: str = "0"
    """TORCHELASTIC_RESTART_COUNT: which elastic restart of the ranks this is."""
    mixed_precision: str = "no"
    """ACCELERATE_MIXED_PRECISION: what `accelerate launch --mixed_precision` (or accelerate config) asked."""

    @property
    def local_leader(self) -> bool:
        """The node's first rank: one line per node (the launcher's ranks share its stderr), one copy of
        node-wide work."""
        return self.local_rank == 0


def launch() -> Launch:
    """The launcher's environment, as it is now."""
    env = os.environ
    return Launch(
        rank=int(env.get("RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
        launched="LOCAL_RANK" in env,
        restart=env.get("TORCHELASTIC_RESTART_COUNT", "0"),
        mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no"),
    )


def local_ranks() -> tuple[int, int]:
    """(this process's local rank, the number of ranks on this node), as the launcher set them."""
    here = launch()
    return here.local_rank, here.local_world_size


def is_local_leader() -> bool:
    return launch().local_leader


def session_id() -> str:
    """Shared by the local ranks of one launch (their parent is the launcher), unique per launch."""
    return str(os.getppid() if launch().launched else os.getpid())


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
