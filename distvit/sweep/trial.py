"""One trial: its config, its run launched as a subprocess, its evaluations reported to the study.

The run is an ordinary distvit run in SWEEP_DIR/trials/NNNN/: `python -m distvit.cli train` for one
process, `accelerate launch` for several, its output appended to the trial's logs/train.log. While it
runs, the worker reads the evaluation records of its metrics.jsonl, reports each one to the study, and
when the pruner says stop, writes the run's STOP file with the reason: the run checkpoints, stops, and
records the reason in its summary.json (a STOP file with text ends a run for good). A resumed trial
(`train.resume=auto` in its folder) continues from its checkpoint.

The outcome, from the run's own files: summary.json of a finished run is COMPLETE with the objective of
its last evaluation; summary.json of a run stopped early (pruned) is PRUNED; stopped.json is a stop on
request (the worker was signalled: the trial stays claimed, to be resumed); anything else is FAIL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distvit
from distvit.fileio import atomic_write_bytes
from distvit.sweep.claims import Claim
from distvit.sweep.folder import trial_config_path, trial_dir
from distvit.sweep.spec import SweepSpec
from distvit.sweep.study import SweepStudy

PRUNED_PREFIX = "pruned by the sweep"
STOPPED = "STOPPED"
"""The outcome of a trial stopped on request: still RUNNING in the study, to be resumed."""
LOST = "LOST"
"""The outcome of a trial another worker took over (this worker's heartbeat was too late)."""
# Names of the run folder's files (distvit.run.rundir and engine.stopping; not imported: this package
# reads run folders, it does not train).
METRICS, SUMMARY, STOPPED_RECORD, STOP_FILE = "metrics.jsonl", "summary.json", "stopped.json", "STOP"


@dataclass(frozen=True)
class Launch:
    """How a worker starts its trials: processes per trial, the devices they may use, the port base."""

    processes: int = 1
    gpus: str | None = None
    """CUDA_VISIBLE_DEVICES for the trials (None: as the worker has it)."""
    port: int = 29500


@dataclass(frozen=True)
class Outcome:
    state: str
    """COMPLETE, PRUNED, FAIL (the study's), or STOPPED, LOST."""
    value: float | None = None
    epochs: int | None = None
    note: str = ""


def write_trial_config(spec: SweepSpec, number: int, values: dict[str, Any]) -> Path:
    """SWEEP_DIR/configs/NNNN.yaml: the base config with the trial's parameters, its own run folder and
    W&B run name, validated by the schema."""
    from distvit.config import build_config

    raw = spec.trial_config(values)
    raw["run"].update(dir=str(trial_dir(spec.dir, number)), overwrite=False)
    raw["train"]["resume"] = ""
    raw["tracking"]["run_name"] = f"{spec.name}-{number:04d}"
    cfg = build_config(raw, f"sweep {spec.name}, trial {number}", check_data=False)
    path = trial_config_path(spec.dir, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, cfg.to_yaml().encode())
    return path


def _die_with_parent() -> None:
    """In the child: SIGTERM when the worker dies (Linux), so a killed worker's run checkpoints and stops
    instead of training on unclaimed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def trial_command(spec: SweepSpec, number: int, launch: Launch, resume: bool) -> list[str]:
    args = ["--config", str(trial_config_path(spec.dir, number))] + (["train.resume=auto"] if resume else [])
    if launch.processes == 1:
        return [sys.executable, "-m", "distvit.cli", "train", *args]
    train_py = Path(distvit.__file__).resolve().parent / "train.py"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--multi_gpu"]
    launcher += ["--num_processes", str(launch.processes), "--main_process_port", str(launch.port)]
    return [*launcher, "--max_restarts", "0", "--dynamo_backend", "no", str(train_py), *args]


def evaluations(run_dir: Path, split: str, metric: str) -> dict[int, float]:
    """{epoch: the metric} of the run's evaluation records on `split` so far."""
    found: dict[int, float] = {}
    try:
        text = (run_dir / METRICS).read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line being written
        if isinstance(record, dict) and record.get("split") == split and isinstance(record.get(metric), (int, float)):
            found[int(record["epoch"])] = float(record[metric])
    return found


def read_outcome(run_dir: Path, metric: str) -> Outcome | None:
    """The outcome the run's own files record: COMPLETE or PRUNED from summary.json, STOPPED from
    stopped.json; None when they record neither."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        epochs = summary.get("epochs")
        if summary.get("finished"):
            value = (summary.get("final") or {}).get(metric)
            if isinstance(value, (int, float)):
                return Outcome("COMPLETE", float(value), epochs)
            return Outcome("FAIL", None, epochs, f"its last evaluation has no {metric}")
        return Outcome("PRUNED", None, epochs, str(summary.get("stop_reason")))
    if (run_dir / STOPPED_RECORD).is_file():
        return Outcome(STOPPED)
    return None


class TrialRun:
    """Run trial `number` to its end (or until the worker is asked to stop), reporting to `study`."""

    def __init__(
        self, spec: SweepSpec, study: SweepStudy, claim: Claim, launch: Launch, stop: threading.Event, poll: float = 0.5
    ):
        self.spec, self.study, self.claim, self.launch, self.stop, self.poll = spec, study, claim, launch, stop, poll
        self.number = claim.trial
        self.run_dir = trial_dir(spec.dir, self.number)
        self.pruned = False
        self._reported: set[int] = set()

    def run(self, resume: bool) -> Outcome:
        earlier = read_outcome(self.run_dir, self.spec.objective.metric)
        if earlier is not None and earlier.state != STOPPED:  # ended, but its worker died before telling
            return earlier
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = trial_command(self.spec, self.number, self.launch, resume)
        env = dict(os.environ, WANDB_RUN_GROUP=self.spec.name, PYTHONUNBUFFERED="1")
        if self.launch.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.launch.gpus
        with open(logs / "train.log", "a") as log:
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== {when} trial {self.number} {'resumed' if resume else 'started'} by {self.claim.identity}\n")
            log.write("=== " + " ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )
            status = self._watch(process)
        return self._outcome(status)

    def _watch(self, process: subprocess.Popen) -> int:
        stop_sent = False
        while True:
            status = process.poll()
            self._report()
            if status is not None:
                return status
            if self.claim.lost.is_set() and not stop_sent:
                process.send_signal(signal.SIGTERM)  # checkpoints and stops; the new owner resumes it
                stop_sent = True
            elif self.stop.is_set() and not stop_sent and not self.pruned:
                self._write_stop("")  # the ranks agree on a step, checkpoint and stop (stopped.json)
                stop_sent = True
            time.sleep(self.poll)

    def _report(self) -> None:
        objective = self.spec.objective
        for epoch, value in sorted(evaluations(self.run_dir, objective.split, objective.metric).items()):
            if self.pruned or epoch in self._reported:
                continue
            self._reported.add(epoch)
            if self.study.report(self.number, epoch, value):
                self.pruned = True
                self._write_stop(
                    f"{PRUNED_PREFIX}: {objective.metric} {value:.4g} after epoch {epoch} "
                    f"({self.spec.pruner.type}, reduction factor {self.spec.pruner.reduction_factor})"
                )

    def _write_stop(self, text: str) -> None:
        atomic_write_bytes(self.run_dir / STOP_FILE, (text + "\n" if text else "").encode())

    def _outcome(self, status: int) -> Outcome:
        if self.claim.lost.is_set():
            return Outcome(LOST)
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # the run is over: a late STOP must not stop its resume
        outcome = read_outcome(self.run_dir, self.spec.objective.metric)
        if outcome is not None:
            return outcome
        return Outcome("FAIL", note=f"the run exited with status {status}; see {self.run_dir / 'logs' / 'train.log'}")
