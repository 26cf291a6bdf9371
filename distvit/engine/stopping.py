"""Stopping on request: SIGUSR1 or SIGTERM to any rank, or a file named STOP in the run directory.

A signal only sets a flag. Every `every` optimizer steps (the same steps on every rank) the ranks
all-reduce their flags, so all of them stop after the same step, write one checkpoint together and
exit with EXIT_STOPPED. The torchrun / accelerate agent forwards SIGTERM to its workers (and SIGKILLs
them ~30 s later), so a checkpoint interval of a few seconds is what preemption needs.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

STOP_FILE = "STOP"
EXIT_STOPPED = 3
"""Exit status of a training process that stopped on request after writing its checkpoint."""
HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
SIGNAL_NAMES = tuple(signum.name for signum in HANDLED_SIGNALS)
REASONS = (*SIGNAL_NAMES, f"{STOP_FILE} file")
"""What can ask for a stop, in the order that names an agreed stop when several did."""
PLANNED_STOP = "train.stop_at_step"
"""The reason of a planned stop (train.stop_at_step): the run exits 0, not EXIT_STOPPED."""


class StopRequests:
    def __init__(self, run_dir: Path, accelerator: Accelerator, every: int, stop_at_step: int = 0):
        self.stop_file = run_dir / STOP_FILE
        self.accelerator = accelerator
        self.every = every
        self.stop_at_step = stop_at_step
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def _local_flags(self) -> list[int]:
        """One flag per entry of REASONS: which requests this rank has seen."""
        return [int(self.received == name) for name in SIGNAL_NAMES] + [int(self.stop_file.exists())]

    def agreed(self, step: int, force: bool = False) -> str | None:
        """At every `every`-th step (or when `force`, at points all ranks reach together): the reason to stop
        if any rank was asked to, else None. A collective when there are several ranks; every rank gets the
        same reason (the first in REASONS that any rank saw), whichever rank saw it."""
        if not force and step % self.every:
            return None
        flags = self._local_flags()
        if self.accelerator.num_processes > 1:
            summed = self.accelerator.reduce(torch.tensor(flags, device=self.accelerator.device), reduction="sum")
            flags = summed.tolist()
        seen = [reason for reason, count in zip(REASONS, flags) if count]
        return seen[0] if seen else None

    def reason(self, step: int, at_epoch_end: bool = False) -> str | None:
        """Why to stop after `step`, if at all: a request (agreed by all ranks; it wins, so a signal at the
        planned step still exits as stopped and a STOP file is consumed) or train.stop_at_step. At an
        epoch's end requests are checked whatever the interval (all ranks reach it together)."""
        requested = self.agreed(step, force=at_epoch_end)
        planned = bool(self.stop_at_step) and step == self.stop_at_step
        return requested or (PLANNED_STOP if planned else None)

    def consume_stop_file(self) -> None:
        """Main process: remove STOP so that the resumed run does not stop again at once."""
        if self.accelerator.is_main_process:
            self.stop_file.unlink(missing_ok=True)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
