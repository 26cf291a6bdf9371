"""Claims and heartbeats: one owner per trial, a requeued worker finds its own, a silent one is replaced."""

from __future__ import annotations

import json
import os
import time

from distvit.sweep.claims import Claim, read_claims, worker_identity
from distvit.sweep.folder import CLAIMS, open_sweep
from distvit.sweep.spec import load_sweep_file
from distvit.sweep.trial import Launch
from distvit.sweep.worker import Worker
from tests.support.sweeps import write_sweep


def test_worker_keys(monkeypatch):
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert worker_identity()["key"] == f"pid:{worker_identity()['host']}:{os.getpid()}"
    assert worker_identity("gpu01")["key"] == "name:gpu01"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    identity = worker_identity()
    assert identity["key"] == "slurm:70_3" and identity["slurm"] == "70_3"  # the same after a requeue


def test_a_claim_is_taken_once_and_beats(tmp_path):
    me, other = worker_identity("a"), worker_identity("b")
    claim = Claim(tmp_path, 4, 0, me, timeout=0.2)
    assert claim.take()
    assert not Claim(tmp_path, 4, 0, other, timeout=0.2).take()  # O_EXCL: the second taker fails
    first = read_claims(tmp_path)[4].heartbeat
    time.sleep(0.2)
    newest = read_claims(tmp_path)[4]
    assert newest.key == "name:a" and newest.generation == 0 and newest.heartbeat > first
    assert newest.age() < 0.2
    claim.release()
    assert read_claims(tmp_path) == {} and os.listdir(tmp_path) == []


def test_a_worker_whose_trial_was_taken_over_learns_it(tmp_path):
    slow = Claim(tmp_path, 1, 0, worker_identity("slow"), timeout=0.2)
    assert slow.take()
    assert Claim(tmp_path, 1, 1, worker_identity("new"), timeout=0.2).take()
    assert slow.lost.wait(2.0)
    assert read_claims(tmp_path)[1].key == "name:new"  # the newest generation owns the trial
    slow.stop_beating()


def _worker(spec, name):
    return Worker(spec, Launch(), name)


def _write_claim(claims_dir, trial, generation, key, age):
    claims_dir.mkdir(exist_ok=True)
    record = {"trial": trial, "generation": generation, "key": key, "heartbeat": time.time() - age}
    (claims_dir / f"{trial:04d}.{generation:03d}.json").write_text(json.dumps(record))


def test_a_worker_takes_its_own_trial_then_a_silent_ones_then_a_new_one(small_dataset, tmp_path):
    spec = open_sweep(load_sweep_file(write_sweep(tmp_path, small_dataset, trials=4, heartbeat_timeout_s=10)))
    claims_dir = spec.dir / CLAIMS
    setup = _worker(spec, "setup")
    for _ in range(3):
        setup.study.ask()  # trials 0, 1, 2 RUNNING
    _write_claim(claims_dir, 0, 0, "name:alive", age=1)
    _write_claim(claims_dir, 1, 0, "name:dead", age=60)
    _write_claim(claims_dir, 2, 2, "name:me", age=60)

    jobs = [_worker(spec, name)._next() for name in ("me", "other", "third")]
    try:
        taken = [(job.claim.trial, job.claim.generation, job.resume) for job in jobs]
        # its own trial first (however old its claim), then the silent worker's, then a new one (4 of 4 asked)
        assert taken == [(2, 3, True), (1, 1, True), (3, 0, False)]
        assert read_claims(claims_dir)[1].key == "name:other" and read_claims(claims_dir)[2].key == "name:me"
        assert (spec.dir / "configs" / "0003.yaml").is_file()
        assert _worker(spec, "fourth")._next() is None  # trial 0's worker is alive; the budget is taken
        assert sorted(setup.study.states().values()) == ["RUNNING"] * 4
    finally:
        for job in jobs:
            job.claim.stop_beating()


def test_releasing_a_claim_removes_only_that_trials_claim_files(tmp_path):
    """A finished trial's claims go; another trial's claims and any other file in the folder stay."""
    me = worker_identity("a")
    claim = Claim(tmp_path, 4, 1, me, timeout=60)
    assert claim.take()
    _write_claim(tmp_path, 4, 0, "name:old", age=600)  # the generation it took over
    _write_claim(tmp_path, 14, 0, "name:b", age=1)  # another trial, whose number contains 4
    (tmp_path / "0004.notes.txt").write_text("not a claim")
    claim.release()
    assert sorted(os.listdir(tmp_path)) == ["0004.notes.txt", "0014.000.json"]


def test_a_stop_file_left_after_the_trials_run_ended_is_removed_before_its_outcome_is_read(small_dataset, tmp_path):
    """The worker may write STOP (a pruning decision) just after the run exited: left there, it would stop
    the trial's resume at once. Only the trial's own run folder, inside the sweep folder, is touched."""
    import threading

    from distvit.sweep.study import SweepStudy
    from distvit.sweep.trial import TrialRun

    spec = open_sweep(load_sweep_file(write_sweep(tmp_path, small_dataset)))
    claim = Claim(spec.dir / CLAIMS, 0, 0, worker_identity("a"), timeout=60)
    run = TrialRun(spec, SweepStudy(spec), claim, Launch(1, None, 29500), threading.Event())
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "STOP").write_text("pruned by the sweep: late\n")
    (run.run_dir / "notes.txt").write_text("mine")
    outcome = run._outcome(1)
    assert outcome.state == "FAIL" and "exited with status 1" in outcome.note
    assert sorted(os.listdir(run.run_dir)) == ["notes.txt"]
