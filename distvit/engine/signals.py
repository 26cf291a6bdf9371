"""Stop requests by signal, from the training entry point's first line to the process's end.

SIGTERM (scancel, preemption, the launcher passing on its own), SIGUSR1 (Slurm's --signal) and SIGINT
(Ctrl-C) ask a training run to stop. What a request does depends on how far the process has got:

- start-up (until the trainer can agree on a stop step, see distvit.engine.stopping): nothing has been
  trained, so there is nothing to checkpoint: the process stops at once with `StoppedDuringStartup`
  (exit EXIT_STOPPED, one line), except inside `deferred()` (the run directory being prepared), which
  it leaves whole first. A long start-up (shard hashing, decoding a split, waiting for a peer) is not
  waited out: the launcher SIGKILLs ~30 s after its SIGTERM.
- training: `StopRequests` takes over (the ranks agree on a step, checkpoint, exit EXIT_STOPPED); a
  request that came before it existed is handed to it (`take_request`).
- the end (outputs, W&B): noted and otherwise ignored, so that the outputs are finished; never a
  KeyboardInterrupt traceback.

A second SIGINT, more than REPEAT_S after the first, exits at once in every phase (status 130, one
line). The torchrun agent passes a Ctrl-C on as a SIGINT of its own, and Slurm signals every process of
a step: one request can arrive twice within milliseconds, hence the interval.

Only the standard library here (and distvit.data.node, which is only that): `install` runs before torch
is imported. One line per node (`is_local_leader`): the ranks a launcher started share its stderr, and a
signal reaches them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from distvit.data.node import is_local_leader

EXIT_STOPPED = 3
"""Exit status of a training process that stopped on request (after its checkpoint, if it had one to write)."""
EXIT_INTERRUPTED = 130
"""Exit status after a second Ctrl-C (the shell's 128 + SIGINT)."""
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
REPEAT_S = 1.0
"""A SIGINT within this many seconds of the first is the same request (see the module's docstring)."""

START_UP, TRAINING, END = "start-up", "training", "end"


class StoppedDuringStartup(BaseException):
    """A stop request before the first training step. A BaseException, as KeyboardInterrupt: it may be
    raised wherever the process is, and no `except Exception` on the way may take it for an error."""

    exit_code = EXIT_STOPPED

    def __init__(self, reason: str, first_step: int | None):
        self.reason, self.first_step = reason, first_step
        where = f"before step {first_step}" if first_step else "before its first step"
        super().__init__(
            f"stopped by {reason} during start-up, {where}; nothing new to checkpoint; continue with train.resume=auto."
        )


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.phase = START_UP
        self.request: str | None = None
        """The first stop request, by signal name."""
        self.first_sigint: float | None = None
        self.deferring = 0
        self.raised = False
        self.first_step: int | None = None


_state = _State()


def install() -> None:
    """Training entry points, first thing: SIGTERM, SIGUSR1 and SIGINT become stop requests for the rest
    of the process (StopRequests replaces these handlers while it runs and puts them back after)."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    _state.installed = True


def installed() -> bool:
    """Whether this process is a training entry point's (SIGINT is then a stop request, see StopRequests)."""
    return _state.installed


def _on_signal(signum: int, frame: object) -> None:
    name = note(signum)
    if _state.phase == TRAINING:  # between two trainers' StopRequests (benchmarks): kept for the next one
        _state.request = _state.request or name
    elif _state.phase == START_UP:
        _state.request = _state.request or name
        if not _state.deferring:
            _raise_if_requested()


def note(signum: int) -> str:
    """Every handler of these signals calls this first: a second SIGINT exits at once. Returns the name."""
    if signum == signal.SIGINT:
        now = time.monotonic()
        if _state.first_sigint is not None and now - _state.first_sigint > REPEAT_S:
            exit_at_once()
        if _state.first_sigint is None:
            _state.first_sigint = now
    return signal.Signals(signum).name


def take_request() -> str | None:
    """The stop request these handlers kept (one that came during start-up), for StopRequests; once."""
    request, _state.request = _state.request, None
    return request


def expect_first_step(step: int) -> None:
    """The step training starts with (a resumed run's next one), for the start-up stop's message."""
    _state.first_step = step


def enter(phase: str) -> None:
    """START_UP -> TRAINING (StopRequests is there) -> END (training is over)."""
    _state.phase = phase


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A start-up stop request waits until the block has ended (without an error of its own)."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    if _state.phase == START_UP and not _state.deferring:
        _raise_if_requested()


def _raise_if_requested() -> None:
    if _state.request is not None and not _state.raised:
        _state.raised = True  # once: the launcher's own copy of the signal must not interrupt the exit
        raise StoppedDuringStartup(_state.request, _state.first_step)


def report_startup_stop(stop: StoppedDuringStartup) -> int:
    """Its one line (once per node), and the exit status."""
    if is_local_leader():
        print(f"distvit: {stop}", file=sys.stderr, flush=True)
    return stop.exit_code


def exit_at_once() -> None:
    """The second Ctrl-C: no checkpoint, no cleanup that could block (W&B, collectives)."""
    if is_local_leader():
        line = (
            "distvit: interrupted again (SIGINT): exiting at once, without a checkpoint; continue from the last "
            "one with train.resume=auto.\n"
        )
        try:  # what the process printed so far comes first (the handler may interrupt a write: best effort)
            sys.stdout.flush()
        except Exception:
            pass
        os.write(2, line.encode())
    os._exit(EXIT_INTERRUPTED)
