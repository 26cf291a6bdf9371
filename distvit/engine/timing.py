"""Where a training step's time goes, measured without synchronising inside the step.

On a GPU each phase boundary records a CUDA event (the host does not wait); the durations are read
once, at the end. On a CPU every operation has finished when the call returns, so wall-clock marks
measure the phases directly.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock times mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self._last: object = None

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """The start of a step (its first phase runs from here)."""
        self._last = self._now()

    def mark(self, phase: str) -> None:
        """The end of `phase`, which began at the previous mark or `start`."""
        now = self._now()
        self._marks.append((phase, self._last, now))
        self._last = now

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase over all steps (on a GPU: device time between the marks)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        for phase, begin, end in self._marks:
            totals[phase] += begin.elapsed_time(end) / 1000 if self.cuda else end - begin
        return dict(totals)
