"""distvit.engine.stopping: stop requests (signals, STOP file) agreed by the ranks, on one process. When the
ranks agree is decided in distvit.engine.after_step (tests/unit/engine/test_after_step.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from accelerate import Accelerator

from distvit.engine.stopping import StopRequests


def test_stop_requests_from_signal_and_file(tmp_path):
    stops = StopRequests(tmp_path, Accelerator(cpu=True))
    try:
        assert stops.agreed().stop is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stops.agreed().stop == "SIGUSR1"
        stops.received = None
        (tmp_path / "STOP").touch()
        assert stops.agreed().stop == "STOP file"
        stops.consume_stop_file()
        assert not (tmp_path / "STOP").exists() and stops.agreed().stop is None
    finally:
        stops.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


@pytest.fixture
def stops(tmp_path):
    requests = StopRequests(tmp_path, Accelerator(cpu=True))
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


def test_sigusr1_to_this_process_is_seen(stops):
    assert stops.received is None and stops.agreed().stop is None
    send_to_self(signal.SIGUSR1, lambda: stops.received is not None)
    assert stops.received == "SIGUSR1"
    assert stops.agreed().stop == stops.agreed().stop == "SIGUSR1"  # until the run stops


def test_sigterm_is_a_stop_request_too(stops):
    assert handled_by(signal.SIGTERM, stops)  # never send SIGTERM to the test process without the handler
    send_to_self(signal.SIGTERM, lambda: stops.received is not None)
    assert stops.agreed().stop == "SIGTERM"


def test_a_signal_names_the_stop_when_the_stop_file_is_there_too(stops, tmp_path):
    (tmp_path / "STOP").touch()
    send_to_self(signal.SIGUSR1, lambda: stops.received is not None)
    assert stops.agreed().stop == "SIGUSR1"


def test_consume_stop_file_removes_it(stops, tmp_path):
    (tmp_path / "STOP").touch()
    assert stops.agreed().stop == "STOP file"
    stops.consume_stop_file()
    assert not (tmp_path / "STOP").exists() and stops.agreed().stop is None
    stops.consume_stop_file()  # none there: nothing to do


def test_close_restores_the_previous_handlers(tmp_path):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    originals = {signum: signal.signal(signum, previous) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stops = StopRequests(tmp_path, Accelerator(cpu=True))
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


def test_a_noted_sample_problem_is_raised_at_the_next_agreement(stops):
    """One rank's damaged sample waits for the point where all ranks meet, then stops them all."""
    from distvit.errors import DataError

    stops.failures.note("shard.tar sample k7: not a readable image")
    with pytest.raises(DataError, match=r"^shard.tar sample k7: not a readable image \(found by rank 0\)$"):
        stops.agreed()
    stops.failures.note("a later problem")  # the first one is the one reported
    with pytest.raises(DataError, match="k7"):
        stops.agreed()


def test_the_time_based_checkpoint_is_rank_0s_clock(stops):
    assert stops.agreed(checkpoint_time=True).checkpoint_time  # this process is rank 0
    assert not stops.agreed().checkpoint_time
