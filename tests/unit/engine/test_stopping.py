"""distvit.engine.stopping: stop requests (signals, STOP file) agreed at the check interval, on one process."""

from __future__ import annotations

import os
import signal
import time

import pytest
from accelerate import Accelerator

from distvit.engine.stopping import StopRequests


def test_stop_requests_from_signal_and_file(tmp_path):
    from accelerate import Accelerator

    from distvit.engine.stopping import StopRequests

    stops = StopRequests(tmp_path, Accelerator(cpu=True), every=5)
    try:
        assert stops.agreed(5).stop is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stops.agreed(3).stop is None  # only every 5th step (the same steps on every rank)
        assert stops.agreed(10).stop == "SIGUSR1"
        stops.received = None
        (tmp_path / "STOP").touch()
        assert stops.agreed(7, force=True).stop == "STOP file"
        stops.consume_stop_file()
        assert not (tmp_path / "STOP").exists() and stops.agreed(10).stop is None
    finally:
        stops.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


@pytest.fixture
def stops(tmp_path):
    requests = StopRequests(tmp_path, Accelerator(cpu=True), every=5)
    yield requests
    requests.close()


def send_to_self(signum, seen) -> None:
    """Deliver `signum` to this process and wait until `seen()` says its handler ran."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while not seen() and time.monotonic() < deadline:
        time.sleep(0.01)


def handled_by(signum, stops) -> bool:
    return getattr(signal.getsignal(signum), "__self__", None) is stops


def test_agreed_only_at_the_check_interval_unless_forced(stops, tmp_path):
    (tmp_path / "STOP").touch()
    assert [stops.agreed(step).stop for step in (1, 4, 6, 9, 11)] == [None] * 5
    assert stops.agreed(5).stop == stops.agreed(10).stop == "STOP file"
    assert stops.agreed(7, force=True).stop == "STOP file"  # e.g. at an epoch end, which every rank reaches together
    (tmp_path / "STOP").unlink()
    assert stops.agreed(10).stop is None and stops.agreed(7, force=True).stop is None


def test_sigusr1_to_this_process_is_seen(stops):
    assert stops.received is None and stops.agreed(5).stop is None
    send_to_self(signal.SIGUSR1, lambda: stops.received is not None)
    assert stops.received == "SIGUSR1"
    assert stops.agreed(6).stop is None
    assert stops.agreed(6, force=True).stop == stops.agreed(15).stop == "SIGUSR1"


def test_sigterm_is_a_stop_request_too(stops):
    assert handled_by(signal.SIGTERM, stops)  # never send SIGTERM to the test process without the handler
    send_to_self(signal.SIGTERM, lambda: stops.received is not None)
    assert stops.agreed(5).stop == "SIGTERM"


def test_a_signal_names_the_stop_when_the_stop_file_is_there_too(stops, tmp_path):
    (tmp_path / "STOP").touch()
    send_to_self(signal.SIGUSR1, lambda: stops.received is not None)
    assert stops.agreed(5).stop == "SIGUSR1"


def test_consume_stop_file_removes_it(stops, tmp_path):
    (tmp_path / "STOP").touch()
    assert stops.agreed(5).stop == "STOP file"
    stops.consume_stop_file()
    assert not (tmp_path / "STOP").exists() and stops.agreed(5).stop is None
    stops.consume_stop_file()  # none there: nothing to do


def test_close_restores_the_previous_handlers(tmp_path):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    originals = {signum: signal.signal(signum, previous) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stops = StopRequests(tmp_path, Accelerator(cpu=True), every=1)
        try:
            assert all(handled_by(signum, stops) for signum in originals)
            send_to_self(signal.SIGUSR1, lambda: stops.received is not None)
            assert stops.received == "SIGUSR1" and calls == []
        finally:
            stops.close()
        assert all(signal.getsignal(signum) is previous for signum in originals)
        send_to_self(signal.SIGUSR1, lambda: calls)
        assert calls == [signal.SIGUSR1]
        stops.close()  # a second close changes nothing
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        for signum, handler in originals.items():
            signal.signal(signum, handler)


def test_a_noted_sample_problem_is_raised_at_the_next_agreement_not_before(stops):
    """One rank's damaged sample waits for the point where all ranks meet, then stops them all."""
    from distvit.errors import DataError

    stops.failures.note("shard.tar sample k7: not a readable image")
    assert stops.agreed(4).stop is None  # between checks: no collective, nothing raised yet
    with pytest.raises(DataError, match=r"^shard.tar sample k7: not a readable image \(found by rank 0\)$"):
        stops.agreed(5)
    stops.failures.note("a later problem")  # the first one is the one reported
    with pytest.raises(DataError, match="k7"):
        stops.agreed(3, force=True)


def test_the_time_based_checkpoint_is_rank_0s_clock_agreed_at_the_checks(stops):
    assert stops.agreed(5, checkpoint_time=True).checkpoint_time  # this process is rank 0
    assert not stops.agreed(5).checkpoint_time
    assert not stops.agreed(4, checkpoint_time=True).checkpoint_time  # decided only where all ranks meet
    planned = StopRequests(stops.stop_file.parent, stops.accelerator, every=5, stop_at_step=5)
    try:
        agreement = planned.reason(5, checkpoint_time=True)
        assert agreement.stop == "train.stop_at_step" and agreement.checkpoint_time
    finally:
        planned.close()


def test_a_due_checkpoint_checks_for_damaged_samples_but_requests_wait_for_their_interval(stops, tmp_path):
    from distvit.errors import DataError

    (tmp_path / "STOP").touch()
    assert stops.reason(4, checkpoint_due=True).stop is None  # step 4 is not a check step: stops stay at 5, 10...
    assert stops.reason(5).stop == "STOP file"
    stops.failures.note("bad sample")
    with pytest.raises(DataError, match="bad sample"):
        stops.reason(4, checkpoint_due=True)  # but no checkpoint is written after a damaged sample
