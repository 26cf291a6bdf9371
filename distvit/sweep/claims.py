"""Which worker runs which trial: claim files with heartbeats.

A trial being run has a claim, SWEEP_DIR/claims/NNNN.GGG.json (trial NNNN, generation GGG), holding the
worker's identity and a heartbeat timestamp a thread refreshes every `timeout / 4` seconds (at most 10).
The highest generation owns the trial. A claim is taken by creating its file with O_CREAT | O_EXCL, so of
two workers taking the same trial exactly one succeeds; nothing is ever overwritten but one's own claim.

- A worker whose claim's key is its own (a requeued Slurm array task: the same array job and task id; a
  worker restarted with the same --name) takes the next generation and resumes the trial.
- Another worker takes over a trial whose newest claim's heartbeat is older than the timeout (the worker
  died without a requeue). The old worker, if it was only slow, sees the newer claim and stops its run.

Heartbeats are wall-clock times: the machines of one sweep need synchronised clocks (NTP), as Slurm does.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distvit.fileio import atomic_write_bytes

_NAME = re.compile(r"(\d{4,})\.(\d{3,})\.json")


def worker_identity(name: str | None = None) -> dict[str, Any]:
    """This worker: host, pid, its Slurm ids, and the key that finds its own claims after a requeue."""
    env = os.environ
    identity: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    if env.get("SLURM_ARRAY_JOB_ID"):
        identity["slurm"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    elif env.get("SLURM_JOB_ID"):
        identity["slurm"] = env["SLURM_JOB_ID"]
    if name:
        identity["key"] = f"name:{name}"
    elif "slurm" in identity:
        identity["key"] = f"slurm:{identity['slurm']}"
    else:  # a process of its own: its claims are never its own again
        identity["key"] = f"pid:{identity['host']}:{identity['pid']}"
    return identity


@dataclass(frozen=True)
class ClaimRecord:
    trial: int
    generation: int
    path: Path
    key: str
    heartbeat: float
    worker: dict[str, Any] = field(default_factory=dict)

    def age(self, now: float | None = None) -> float:
        return (now if now is not None else time.time()) - self.heartbeat


def read_claims(claims_dir: Path) -> dict[int, ClaimRecord]:
    """The newest claim of each trial. A claim file still empty (just created) counts as fresh: its
    heartbeat is the file's modification time."""
    newest: dict[int, ClaimRecord] = {}
    if not claims_dir.is_dir():
        return newest
    for path in claims_dir.iterdir():
        match = _NAME.fullmatch(path.name)
        if not match:
            continue
        trial, generation = int(match.group(1)), int(match.group(2))
        if trial in newest and newest[trial].generation > generation:
            continue
        try:
            data = json.loads(path.read_text() or "{}")
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue  # removed meanwhile, or half-visible on a slow filesystem: the next look sees it
        newest[trial] = ClaimRecord(
            trial, generation, path, data.get("key", ""), float(data.get("heartbeat", mtime)), data.get("worker", {})
        )
    return newest


class Claim:
    """A claim this worker holds, with its heartbeat thread."""

    def __init__(self, claims_dir: Path, trial: int, generation: int, identity: dict[str, Any], timeout: float):
        self.claims_dir, self.trial, self.generation = claims_dir, trial, generation
        self.path = claims_dir / f"{trial:04d}.{generation:03d}.json"
        self.identity = identity
        self.interval = min(timeout / 4, 10.0)
        self.started = time.time()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> bool:
        """Create the claim file; False when another worker created it first."""
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.trial}", daemon=True)
        self._thread.start()
        return True

    def beat(self) -> None:
        record = {
            "trial": self.trial,
            "generation": self.generation,
            "key": self.identity["key"],
            "worker": self.identity,
            "started": self.started,
            "heartbeat": time.time(),
        }
        atomic_write_bytes(self.path, (json.dumps(record) + "\n").encode())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            newest = read_claims(self.claims_dir).get(self.trial)
            if newest is not None and newest.generation > self.generation:
                self.lost.set()  # another worker took the trial over: stop beating, the run stops
                return
            try:
                self.beat()
            except OSError:
                pass  # a filesystem hiccup: the next beat tries again, well within the timeout

    def stop_beating(self) -> None:
        """The trial stays claimed (a stopped trial its requeued worker resumes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """The trial is finished: its claims go."""
        self.stop_beating()
        for path in self.claims_dir.glob(f"{self.trial:04d}.*.json"):
            path.unlink(missing_ok=True)
