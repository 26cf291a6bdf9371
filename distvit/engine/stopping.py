"""Stopping on request: SIGUSR1 or SIGTERM to any rank (SIGINT too in a training entry point, see
distvit.engine.signals), or a file named STOP in the run directory.

A signal only sets a flag. At the steps where the ranks check (the same steps on every rank, decided in
distvit.engine.after_step) they all-reduce their flags, so all of them stop after the same step, write one
checkpoint together and exit with EXIT_STOPPED. The same small all-reduce carries the other rank-local
facts that must become joint decisions: a damaged sample one rank met (every rank then raises its
DataError, see distvit.engine.failures) and rank 0's clock for time-based checkpoints
(checkpoint.every_minutes).

The torchrun / accelerate agent forwards SIGTERM to its workers (and SIGKILLs them ~30 s later), so a
checkpoint interval of a few seconds is what preemption needs. Loader workers ignore these signals
(distvit.data.read.loader): the agent signals each rank's whole process group, and a worker that died of it
would take the rank down before it could checkpoint.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from distvit.engine import signals
from distvit.engine.failures import SampleFailures

STOP_FILE = "STOP"
EXIT_STOPPED = signals.EXIT_STOPPED
"""Exit status of a training process that stopped on request after writing its checkpoint."""
HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Always stop requests. SIGINT is one where a training entry point installed distvit.engine.signals;
elsewhere (benchmarks, tests) Ctrl-C keeps interrupting at once."""
SIGNAL_NAMES = tuple(signum.name for signum in (*HANDLED_SIGNALS, signal.SIGINT))
FILE_REASON = f"{STOP_FILE} file"
REASONS = (*SIGNAL_NAMES, FILE_REASON)
"""What can ask for a stop, in the order that names an agreed stop when several did."""
PLANNED_STOP = "train.stop_at_step"
"""The reason of a planned stop (train.stop_at_step): the run exits 0, not EXIT_STOPPED."""


@dataclass(frozen=True)
class Agreement:
    """What all ranks decided together after a step."""

    stop: str | None = None
    """The request to stop (the first entry of REASONS any rank saw), None when there was none."""
    checkpoint_time: bool = False
    """Rank 0's clock says a time-based checkpoint is due."""


class StopRequests:
    def __init__(self, run_dir: Path, accelerator: Accelerator, failures: SampleFailures | None = None):
        self.stop_file = run_dir / STOP_FILE
        self.accelerator = accelerator
        self.failures = failures or SampleFailures(accelerator)
        self.received: str | None = signals.take_request()  # one that came while the process started
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (*HANDLED_SIGNALS, signal.SIGINT) if signals.installed() else HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        signals.enter(signals.TRAINING)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signals.note(signum)  # a second Ctrl-C exits there, at once

    def _local_flags(self, checkpoint_time: bool) -> list[int]:
        """One flag per entry of REASONS (which requests this rank has seen), then whether this rank holds
        a damaged sample, then whether (rank 0's clock) a time-based checkpoint is due."""
        requests = [int(self.received == name) for name in SIGNAL_NAMES] + [int(self.stop_file.exists())]
        return [*requests, self.failures.flag(), int(checkpoint_time and self.accelerator.is_main_process)]

    def agreed(self, checkpoint_time: bool = False) -> Agreement:
        """What the ranks decide together, at a step all of them reach (see distvit.engine.after_step): stop
        if any rank was asked to (every rank gets the same reason, the first in REASONS that any rank saw),
        a time-based checkpoint if rank 0's `checkpoint_time`. A collective when there are several ranks.
        A damaged sample held by any rank is raised here, on every rank."""
        flags = self._local_flags(checkpoint_time)
        if self.accelerator.num_processes > 1:
            summed = self.accelerator.reduce(torch.tensor(flags, device=self.accelerator.device), reduction="sum")
            flags = summed.tolist()
        *requests, failures, clock = flags
        self.failures.raise_if_any(failures)
        seen = [reason for reason, count in zip(REASONS, requests) if count]
        return Agreement(stop=seen[0] if seen else None, checkpoint_time=bool(clock))

    def note(self) -> str:
        """The STOP file's text ('' when it is empty or gone; main process, before consuming it). A STOP
        with text ends the run for good, the text its reason in summary.json (a sweep's pruned trial)."""
        try:
            return self.stop_file.read_text(errors="replace").strip()[:500]
        except OSError:
            return ""

    def consume_stop_file(self) -> None:
        """Main process: remove STOP so that the resumed run does not stop again at once."""
        if self.accelerator.is_main_process:
            self.stop_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Training is over: the previous handlers again (an entry point's note requests and let the
        outputs finish, see distvit.engine.signals)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        signals.enter(signals.END)
