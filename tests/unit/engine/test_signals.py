"""distvit.engine.signals: stop requests from the entry point's first line to the process's end: at once
during start-up (after the run directory is whole), handed to StopRequests for training, only noted at
the end; a second Ctrl-C exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from accelerate import Accelerator

from distvit.engine import signals
from distvit.engine.stopping import StopRequests
from tests.support.helpers import REPO, subprocess_env


@pytest.fixture
def entry_point(monkeypatch):
    """This process as a training entry point: fresh signal state, the handlers installed, then put back."""
    monkeypatch.setattr(signals, "_state", signals._State())
    saved = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
    signals.install()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def wait_for_signal() -> None:
    time.sleep(1.0)  # a handler that raises ends this early


def test_a_request_during_start_up_stops_at_once(entry_point):
    with pytest.raises(signals.StoppedDuringStartup) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for_signal()
    assert stop.value.exit_code == 3
    assert str(stop.value) == (
        "stopped by SIGUSR1 during start-up, before its first step; nothing new to checkpoint; continue with "
        "train.resume=auto."
    )
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's own copy of the signal: the exit goes on
    wait_for_signal()


def test_a_request_while_the_run_directory_is_prepared_waits_for_the_block_to_end(entry_point):
    signals.expect_first_step(11)
    ended = False
    with pytest.raises(signals.StoppedDuringStartup) as stop:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_signal()
            ended = True
    assert ended and str(stop.value).startswith("stopped by SIGTERM during start-up, before step 11; ")


def test_an_error_in_the_deferred_block_is_not_hidden_by_the_request(entry_point):
    with pytest.raises(OSError, match="disk full"):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_signal()
            raise OSError("disk full")


def test_stop_requests_take_over_a_request_from_before_they_existed(entry_point, tmp_path):
    with signals.deferred():  # the request is kept, not raised, while the trainer is being built
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signal()
        stops = StopRequests(tmp_path, Accelerator(cpu=True))
    try:  # training now: the block's end raised nothing, the ranks agree on a stop step instead
        assert stops.agreed().stop == "SIGTERM"
        assert signals.take_request() is None  # handed over once
        assert signal.getsignal(signal.SIGINT).__self__ is stops  # Ctrl-C is a stop request in an entry point
    finally:
        stops.close()
    assert signal.getsignal(signal.SIGINT) is signals._on_signal  # the end: noted, never a KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGUSR1)
    wait_for_signal()


def test_outside_an_entry_point_ctrl_c_stays_an_interrupt(monkeypatch, tmp_path):
    """Benchmarks and tests keep SIGINT as they found it: Python's KeyboardInterrupt, or ignored where the
    shell started them in the background (a CI script run with `&` inherits SIGINT ignored)."""
    monkeypatch.setattr(signals, "_state", signals._State())
    before = signal.getsignal(signal.SIGINT)
    assert before in (signal.default_int_handler, signal.SIG_IGN)
    stops = StopRequests(tmp_path, Accelerator(cpu=True))
    try:
        assert signal.getsignal(signal.SIGINT) is before
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # while SIGTERM is a stop request
    finally:
        stops.close()


END_PHASE = """
import sys, time
from distvit.engine import signals
signals.install()
signals.enter(signals.END)  # as after training: the outputs and W&B are being finished
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
print("finished", flush=True)
"""


def end_phase(seconds: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(END_PHASE), str(seconds)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "ready\n"
    return process


def test_ctrl_c_at_the_end_is_noted_and_the_outputs_finish():
    process = end_phase(2.0)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # the launcher passing the same Ctrl-C on: one request
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and out == "finished\n" and err == ""


def test_a_second_ctrl_c_exits_at_once_with_one_line():
    process = end_phase(60.0)
    process.send_signal(signal.SIGINT)
    time.sleep(signals.REPEAT_S + 0.2)
    assert process.poll() is None
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert process.returncode == 130 and out == ""
    assert err == (
        "distvit: interrupted again (SIGINT): exiting at once, without a checkpoint; continue from the last one "
        "with train.resume=auto.\n"
    )
