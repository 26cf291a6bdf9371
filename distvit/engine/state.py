"""The counters a run resumes from: where training is (epoch, step, samples of the epoch) and what its
evaluations said. Everything else a checkpoint holds belongs to the part that owns it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Completed optimizer steps."""
    samples_in_epoch: int = 0
    """Samples of the current epoch already trained on (all ranks): where a resume continues."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    best_score: float = -math.inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "samples_in_epoch": self.samples_in_epoch,
            "metrics": dict(self.last_eval),
            "best_score": self.best_score,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        self.last_eval = dict(state["metrics"])
        self.best_score = state.get("best_score", -math.inf)  # absent in the earliest checkpoints

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.samples_in_epoch = 0
