"""`distvit sweep run`: a worker that pulls trials until the sweep's number of trials is reached.

Start K workers side by side (each on its own GPUs) or as a Slurm job array (slurm/sweep.sbatch). Under
the sweep folder's lock a worker takes, in this order: a trial claimed under its own key (a requeued
array task: resumed with train.resume=auto), a trial whose worker's heartbeat went silent (handed over,
resumed the same way), or a new trial from the study. A trial is one Optuna trial from its start to the
worker that tells its end, so no trial is counted twice; trials count when COMPLETE, PRUNED or FAIL.
With nothing to take while other workers' trials run, it waits: their workers may die.

SIGTERM, SIGUSR1 and SIGINT ask the worker to stop: its trial checkpoints and stops, stays claimed, and
the worker exits with status 3 (the Slurm script then requeues the task, which resumes the trial).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from distvit.errors import ConfigError
from distvit.sweep.claims import Claim, read_claims, worker_identity
from distvit.sweep.folder import CLAIMS, load_sweep, open_sweep, sweep_lock, trial_config_path
from distvit.sweep.spec import SweepSpec, load_sweep_file
from distvit.sweep.study import FINISHED, SweepStudy
from distvit.sweep.trial import LOST, STOPPED, Launch, Outcome, TrialRun, write_trial_config

EXIT_STOPPED = 3
"""A worker stopped on request with its trial unfinished (distvit.engine.stopping's status for a run)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def open_source(source: str, overrides: list[str], directory: str | None) -> SweepSpec:
    """The sweep of a sweep file (its folder created or joined) or of a sweep folder."""
    path = Path(source)
    if path.is_dir():
        if overrides or directory:
            raise ConfigError(
                f"{source} is a sweep folder: its config is fixed; overrides and --dir go with a sweep file."
            )
        return load_sweep(path)
    if not path.is_file():
        raise ConfigError(f"{source}: no such sweep file or sweep folder.")
    return open_sweep(load_sweep_file(path, overrides, directory))


def _say(message: str) -> None:
    print(f"distvit sweep: {message}", flush=True)


@dataclass
class _Job:
    claim: Claim
    resume: bool


class Worker:
    def __init__(self, spec: SweepSpec, launch: Launch, name: str | None = None):
        self.spec, self.launch = spec, launch
        self.study = SweepStudy(spec)
        self.identity = worker_identity(name)
        self.claims_dir = spec.dir / CLAIMS
        self.stop = threading.Event()
        self.wait_s = min(5.0, spec.heartbeat_timeout_s / 4)
        self.ran = 0

    def run(self) -> int:
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {signum: signal.signal(signum, lambda *_: self.stop.set()) for signum in STOP_SIGNALS}
        try:
            return self._loop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _loop(self) -> int:
        _say(f"worker {self.identity['key']} on {self.spec.dir} ({self.launch.processes} process(es) per trial)")
        while not self.stop.is_set():
            with sweep_lock(self.spec.dir):
                job = self._next()
            if job is None:
                if self.study.finished() >= self.spec.trials:
                    break
                self.stop.wait(self.wait_s)  # other workers' trials run; one of them may die
                continue
            outcome = self._run(job)
            if outcome.state == STOPPED:
                job.claim.stop_beating()
                _say(f"trial {job.claim.trial:04d} stopped at a checkpoint; it resumes with this worker's requeue")
                return EXIT_STOPPED
        done = self.study.finished()
        _say(f"{done} of {self.spec.trials} trials finished; this worker ran {self.ran}")
        return EXIT_STOPPED if self.stop.is_set() and done < self.spec.trials else 0

    def _take(self, trial: int, generation: int, resume: bool) -> _Job | None:
        claim = Claim(self.claims_dir, trial, generation, self.identity, self.spec.heartbeat_timeout_s)
        return _Job(claim, resume) if claim.take() else None

    def _next(self) -> _Job | None:
        """Under the lock: this worker's own claimed trial, a trial whose worker went silent, or a new one."""
        states = self.study.states()
        running = [number for number, state in states.items() if state == "RUNNING"]
        claims = read_claims(self.claims_dir)
        for number in running:
            claim = claims.get(number)
            if claim is not None and claim.key == self.identity["key"]:
                return self._take(number, claim.generation + 1, resume=True)
        for number in running:
            claim = claims.get(number)
            if claim is None or claim.age() > self.spec.heartbeat_timeout_s:
                who = f"{claim.worker.get('key', '?')}'s heartbeat is {claim.age():.0f} s old" if claim else "unclaimed"
                _say(f"taking over trial {number:04d} ({who})")
                return self._take(number, claim.generation + 1 if claim else 0, resume=True)
        finished = sum(state in FINISHED for state in states.values())
        while finished + len(running) < self.spec.trials:
            number, values = self.study.ask()
            try:
                write_trial_config(self.spec, number, values)
            except ConfigError as err:  # parameters that the schema accepts one by one, not together
                self.study.tell(number, "FAIL", note=str(err))
                _say(f"trial {number:04d} FAIL: {err}")
                finished += 1
                continue
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            _say(f"trial {number:04d}: {shown}")
            return self._take(number, 0, resume=False)
        return None

    def _run(self, job: _Job) -> Outcome:
        number = job.claim.trial
        if not trial_config_path(self.spec.dir, number).is_file():  # its worker died right after asking
            write_trial_config(self.spec, number, self.study.params(number))
        outcome = TrialRun(self.spec, self.study, job.claim, self.launch, self.stop).run(job.resume)
        if outcome.state == LOST:
            job.claim.stop_beating()
            _say(f"trial {number:04d} was taken over by another worker; leaving it")
        elif outcome.state != STOPPED:
            self.study.tell(number, outcome.state, outcome.value, outcome.note)
            job.claim.release()
            self.ran += 1
            value = f" {self.spec.objective.metric} {outcome.value:.4g}" if outcome.value is not None else ""
            note = f" ({outcome.note})" if outcome.note else ""
            epochs = f" after {outcome.epochs} epoch(s)" if outcome.epochs is not None else ""
            _say(f"trial {number:04d} {outcome.state}{value}{epochs}{note}")
        return outcome


def run_worker(
    source: str,
    overrides: list[str],
    *,
    directory: str | None = None,
    processes: int = 1,
    gpus: str | None = None,
    port: int | None = None,
    name: str | None = None,
) -> int:
    if processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {processes}.")
    spec = open_source(source, overrides, directory)
    launch = Launch(processes, gpus, port if port is not None else 29500 + os.getpid() % 2000)
    return Worker(spec, launch, name).run()
