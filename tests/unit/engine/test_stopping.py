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
        assert stops.agreed(5) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stops.agreed(3) is None  # only every 5th step (the same steps on every rank)
        assert stops.agreed(10) == "SIGUSR1"
        stops.received = None
        (tmp_path / "STOP").touch()
        assert stops.agreed(7, force=True) == "STOP file"
        stops.consume_stop_file()
        assert not (tmp_path / "STOP").exists() and stops.agreed(10) is None
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
    assert [stops.agreed(step) for step in (1, 4, 6, 9, 11)] == [None] * 5
    assert stops.agreed(5) == stops.agreed(10) == "STOP file"
    assert stops.agreed(7, force=True) == "STOP file"  # e.g. at an epoch end, which every rank reaches together
    (tmp_path / "STOP").unlink()
    assert stops.agreed(10) is None and stops.agreed(7, force=True) is None


def test_sigusr1_to_this_process_is_seen(stops):
    assert stops.received is None and stops.agreed(5) is None
    send_to_self(signal.SIGUSR1, lambda: stops.received is not None)
    assert stops.received == "SIGUSR1"
    assert stops.agreed(6) is None
    assert stops.agreed(6, force=True) == stops.agreed(15) == "SIGUSR1"


def test_sigterm_is_a_stop_request_too(stops):
    assert handled_by(signal.SIGTERM, stops)  # never send SIGTERM to the test process without the handler
    send_to_self(signal.SIGTERM, lambda: stops.received is not None)
    assert stops.agreed(5) == "SIGTERM"


def test_a_signal_names_the_stop_when_the_stop_file_is_there_too(stops, tmp_path):
    (tmp_path / "STOP").touch()
    send_to_self(signal.SIGUSR1, lambda: stops.received is not None)
    assert stops.agreed(5) == "SIGUSR1"


def test_consume_stop_file_removes_it(stops, tmp_path):
    (tmp_path / "STOP").touch()
    assert stops.agreed(5) == "STOP file"
    stops.consume_stop_file()
    assert not (tmp_path / "STOP").exists() and stops.agreed(5) is None
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
