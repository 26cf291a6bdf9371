"""What the components that act during a run share, built once by the Trainer and passed to each of them:
the processes, where the run lives, the monitor that waits for rank 0's own work, the tracker, the
dataset's classes and the name of the split evaluations run on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from distvit.engine.peers import PeerMonitor
from distvit.run.tracking import RunTracker


@dataclass(frozen=True, kw_only=True)
class RunContext:
    accelerator: Accelerator
    run_dir: Path
    monitor: PeerMonitor
    tracker: RunTracker
    classes: list[str]
    eval_split: str
    """data.eval_split, as the data sources opened it."""
