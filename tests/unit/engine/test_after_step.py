"""distvit.engine.after_step: what a run does after a step, as one table of (step, epoch's end, what the
ranks would agree, intervals) -> (whether they meet, the action)."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from distvit.engine.after_step import Action, AfterStep, Intervals, decide
from distvit.engine.state import TrainState
from distvit.engine.stopping import PLANNED_STOP, Agreement, StopRequests
from distvit.errors import DataError

CHECKS = Intervals(stop_check_every=5)
"""The ranks meet every 5 steps; no count-based checkpoints, no planned stop."""
NOTHING = Agreement()
TERM, STOP_FILE, CLOCK = Agreement(stop="SIGTERM"), Agreement(stop="STOP file"), Agreement(checkpoint_time=True)


def steps(step: int, periodic: bool = False) -> Action:
    return Action(checkpoint=f"step_{step:08d}.pt", periodic=periodic)


def stop(reason: str, step: int) -> Action:
    return Action(stop=reason, checkpoint=f"step_{step:08d}.pt")


TABLE = [
    # step, epochs done, epoch's end, requests, intervals -> the ranks meet, action
    # regular checks: every stop_check_every steps and at every epoch's end
    (4, 0, False, NOTHING, CHECKS, False, Action()),
    (5, 0, False, NOTHING, CHECKS, True, Action()),
    (5, 0, False, TERM, CHECKS, True, stop("SIGTERM", 5)),
    (4, 0, False, TERM, CHECKS, False, Action()),  # a request waits for the next check
    (7, 1, True, STOP_FILE, CHECKS, True, stop("STOP file", 7)),  # an epoch's end is a check
    # count-based checkpoints: a forced meeting (damaged samples), where requests still wait for their check
    (6, 0, False, NOTHING, Intervals(5, every_steps=3), True, steps(6, periodic=True)),
    (6, 0, False, TERM, Intervals(5, every_steps=3), True, steps(6, periodic=True)),
    (15, 0, False, TERM, Intervals(5, every_steps=3), True, stop("SIGTERM", 15)),  # a stop wins: its own checkpoint
    (8, 2, True, NOTHING, Intervals(5, every_epochs=2), True, Action(checkpoint="epoch_002.pt", periodic=True)),
    (4, 1, True, NOTHING, Intervals(5, every_epochs=2), True, Action()),
    (4, 1, True, NOTHING, Intervals(5, every_epochs=2, every_steps=4), True, steps(4, periodic=True)),
    (8, 2, True, NOTHING, Intervals(5, 2, 4), True, Action(checkpoint="epoch_002.pt", periodic=True)),
    (8, 2, False, NOTHING, Intervals(5, every_epochs=2), False, Action()),  # epochs count only at their end
    # time-based checkpoints: rank 0's clock, heard only where the ranks meet
    (5, 0, False, CLOCK, CHECKS, True, steps(5, periodic=True)),
    (4, 0, False, CLOCK, CHECKS, False, Action()),
    (6, 0, False, CLOCK, Intervals(5, every_steps=3), True, steps(6, periodic=True)),
    # train.stop_at_step: a forced meeting too; a request at a regular check names the stop
    (7, 0, False, NOTHING, Intervals(5, stop_at_step=7), True, stop(PLANNED_STOP, 7)),
    (7, 0, False, TERM, Intervals(5, stop_at_step=7), True, stop(PLANNED_STOP, 7)),
    (10, 0, False, TERM, Intervals(5, stop_at_step=10), True, stop("SIGTERM", 10)),
    (5, 0, False, CLOCK, Intervals(5, stop_at_step=5), True, stop(PLANNED_STOP, 5)),
    (8, 0, False, NOTHING, Intervals(5, stop_at_step=7), False, Action()),  # past it (a resumed run)
    (3, 0, False, TERM, Intervals(1), True, stop("SIGTERM", 3)),  # checks at every step
]


@pytest.mark.parametrize("step, epoch, at_epoch_end, requests, intervals, meet, action", TABLE)
def test_the_decision_after_a_step(step, epoch, at_epoch_end, requests, intervals, meet, action):
    asked = []

    def agree() -> Agreement:
        asked.append(step)
        return requests

    assert decide(step, epoch, at_epoch_end, intervals, agree) == action
    assert asked == ([step] if meet else [])  # the ranks meet once, or not at all


def test_the_intervals_come_from_the_checkpoint_section_and_train_stop_at_step():
    from distvit.config import CheckpointConfig

    cfg = CheckpointConfig(every_epochs=2, every_steps=100, stop_check_every=4)
    assert Intervals.of(cfg, stop_at_step=9) == Intervals(4, every_epochs=2, every_steps=100, stop_at_step=9)


@pytest.fixture
def stops(tmp_path):
    requests = StopRequests(tmp_path, Accelerator(cpu=True))
    yield requests
    requests.close()


def test_a_damaged_sample_stops_the_run_before_a_checkpoint_is_written(stops, tmp_path):
    """The forced meeting at a checkpoint due by count raises a rank's damaged sample on every rank, before
    anything is saved; between meetings nothing is raised yet."""
    from distvit.config import CheckpointConfig

    after = AfterStep(
        CheckpointConfig(every_epochs=0, every_steps=3, stop_check_every=5), stop_at_step=0, stops=stops, clock=bool
    )
    stops.failures.note("shard.tar sample k7: not a readable image")
    assert after(TrainState(step=2), at_epoch_end=False) == Action()
    with pytest.raises(DataError, match="k7"):
        after(TrainState(step=3), at_epoch_end=False)


def test_the_clock_is_read_only_where_the_ranks_meet(stops, tmp_path):
    from distvit.config import CheckpointConfig

    readings = []

    def clock() -> bool:
        readings.append(True)
        return True

    after = AfterStep(CheckpointConfig(every_epochs=0, stop_check_every=5), stop_at_step=0, stops=stops, clock=clock)
    assert after(TrainState(step=4), at_epoch_end=False) == Action() and readings == []
    assert after(TrainState(step=5), at_epoch_end=False) == steps(5, periodic=True) and readings == [True]
    (tmp_path / "STOP").touch()
    assert after(TrainState(step=10), at_epoch_end=False) == stop("STOP file", 10)
