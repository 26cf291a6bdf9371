"""distvit.engine.timing: PhaseTimer on the CPU measures each phase between its marks, summed over steps."""

from __future__ import annotations

import time

import pytest
import torch

from distvit.engine.timing import PhaseTimer


def test_phases_are_timed_between_marks_and_summed_over_steps():
    timer = PhaseTimer(torch.device("cpu"))
    assert not timer.cuda and timer.seconds() == {}
    begin = time.perf_counter()
    for _ in range(2):
        timer.start()
        time.sleep(0.02)
        timer.mark("data")
        time.sleep(0.06)
        timer.mark("forward")
        timer.mark("backward")  # nothing ran since the last mark
    wall = time.perf_counter() - begin
    seconds = timer.seconds()
    assert list(seconds) == ["data", "forward", "backward"]  # in the order first marked
    assert all(value >= 0 for value in seconds.values())
    assert 0.04 <= seconds["data"] < 0.11  # 2 x 20 ms
    assert 0.12 <= seconds["forward"] < 0.25  # 2 x 60 ms: a swapped or misattributed phase falls outside
    assert seconds["forward"] > 2 * seconds["data"]
    assert seconds["backward"] < 0.02
    assert sum(seconds.values()) == pytest.approx(wall, abs=0.02)


def test_time_between_steps_is_not_counted():
    timer = PhaseTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.02)
    timer.mark("step")
    time.sleep(0.1)  # logging, evaluation...: outside any phase
    timer.start()
    time.sleep(0.02)
    timer.mark("step")
    assert 0.04 <= timer.seconds()["step"] < 0.12  # 0.14 if the gap counted
