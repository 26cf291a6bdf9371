"""What a run does after each optimizer step and at each epoch's end, decided in one place (`decide`):
whether the ranks meet to agree, whether the run stops, and which checkpoint is written. The last epoch's
end is not decided here: the run ends there with final.pt. This module reads the checkpoint section's
intervals (with train.stop_at_step, given to it).

    the ranks agree          at a regular check: every checkpoint.stop_check_every steps and at each
    (StopRequests.agreed)    epoch's end (all ranks reach it together); and, forced, wherever a checkpoint
                             will be written by count or at train.stop_at_step: no checkpoint holds steps
                             after a damaged sample (distvit.engine.failures)
    stop on a request        only at a regular check: a request seen at a forced check waits for the next
                             regular one, so the steps a stop can happen at stay those documented
    stop at stop_at_step     at that step, unless a request stops the run there (the request names it)
    a stop writes            step_NNNNNNNN.pt (nothing is pruned: the run ends there)
    otherwise, by count      epoch_NNN.pt at the end of every checkpoint.every_epochs-th epoch, else
                             step_NNNNNNNN.pt every checkpoint.every_steps steps (periodic: the older
                             epoch_ and step_ files beyond checkpoint.keep_last are pruned after it)
    otherwise, by time       step_NNNNNNNN.pt when rank 0's clock says checkpoint.every_minutes passed
                             (agreed at a check; periodic)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distvit.config import CheckpointConfig
from distvit.engine.state import TrainState
from distvit.engine.stopping import PLANNED_STOP, Agreement, StopRequests
from distvit.run.checkpoint_files import epoch_name, step_name


@dataclass(frozen=True)
class Intervals:
    """When the ranks check for requests and when checkpoints are due by count (0: never)."""

    stop_check_every: int = 10
    every_epochs: int = 0
    every_steps: int = 0
    stop_at_step: int = 0

    @classmethod
    def of(cls, cfg: CheckpointConfig, stop_at_step: int) -> Intervals:
        """From the checkpoint section, and train.stop_at_step."""
        return cls(cfg.stop_check_every, cfg.every_epochs, cfg.every_steps, stop_at_step)


@dataclass(frozen=True)
class Action:
    """What to do after a step."""

    stop: str | None = None
    """Why the run stops here (an entry of distvit.engine.stopping.REASONS, or PLANNED_STOP); None: go on."""
    checkpoint: str | None = None
    """The checkpoint file to write now, if any."""
    periodic: bool = False
    """A periodic checkpoint (by count or time): the older epoch_/step_ files beyond checkpoint.keep_last
    are pruned once it is written."""


def decide(step: int, epoch: int, at_epoch_end: bool, intervals: Intervals, agree: Callable[[], Agreement]) -> Action:
    """After optimizer step `step` (`epoch` epochs completed; `at_epoch_end`: the step ended an epoch that
    is not the run's last): `agree` is called, once, where the ranks meet (see the module's table)."""
    by_count = None
    if at_epoch_end and intervals.every_epochs and epoch % intervals.every_epochs == 0:
        by_count = epoch_name(epoch)
    elif intervals.every_steps and step % intervals.every_steps == 0:
        by_count = step_name(step)
    planned = bool(intervals.stop_at_step) and step == intervals.stop_at_step
    regular = at_epoch_end or step % intervals.stop_check_every == 0
    agreed = agree() if regular or by_count or planned else Agreement()
    stop = agreed.stop if regular else None
    if stop is None and planned:
        stop = PLANNED_STOP
    if stop is not None:
        return Action(stop=stop, checkpoint=step_name(step))
    name = by_count or (step_name(step) if agreed.checkpoint_time else None)
    return Action(checkpoint=name, periodic=name is not None)


class AfterStep:
    """The decision with its inputs: the intervals, the ranks' agreement on requests, and the clock of
    time-based checkpoints (`clock`: whether checkpoint.every_minutes passed on this rank's clock since
    the last checkpoint; rank 0's answer counts)."""

    def __init__(self, cfg: CheckpointConfig, *, stop_at_step: int, stops: StopRequests, clock: Callable[[], bool]):
        self.intervals = Intervals.of(cfg, stop_at_step)
        self.stops, self.clock = stops, clock

    def __call__(self, state: TrainState, at_epoch_end: bool) -> Action:
        agree = lambda: self.stops.agreed(checkpoint_time=self.clock())  # noqa: E731
        return decide(state.step, state.epoch, at_epoch_end, self.intervals, agree)
