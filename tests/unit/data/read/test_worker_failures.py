"""Loader workers and their rank (distvit.data.read.loader): a worker that dies is one message naming it, its
shards and the likely cause (the others go on with stand-ins until the ranks stop together); stop
signals are the rank's business, not its workers'; and workers end with their rank."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.read.loader import MemoryBatches, ShardSamples, StreamBatches, index_shards
from distvit.data.read.memory import load_split
from distvit.errors import DataError
from tests.support.helpers import REPO, subprocess_env

CPU = torch.device("cpu")
BATCH = 8
KILL_STEP = 6
"""The batch whose first sample kills the worker reading it (worker KILL_STEP % 2 of two)."""


class KillingSamples(ShardSamples):
    """A worker SIGKILLs itself when asked for sample `kill_at`, as the kernel's OOM killer would."""

    kill_at = -1

    def __getitem__(self, index: int):
        if index == self.kill_at:
            time.sleep(0.3)  # what this worker delivered before is on its way to the rank
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


def killing_stream(dataset) -> StreamBatches:
    manifest = read_manifest(dataset)
    stream = StreamBatches(dataset, manifest, "train", 2, CPU)
    paths, locations = index_shards(dataset, manifest, "train")
    stream.samples = KillingSamples(paths, locations, None, manifest.image_size)
    stream.samples.kill_at = KILL_STEP * BATCH
    return stream


def expected_message_start(stream: StreamBatches) -> str:
    shard = stream.shards_of(list(range(KILL_STEP * BATCH, (KILL_STEP + 1) * BATCH)))
    return (
        rf"loader worker {KILL_STEP % 2} \(pid \d+\) was killed by SIGKILL while reading {re.escape(', '.join(shard))} "
    )


def test_a_dead_worker_on_one_rank_is_one_error_naming_it_its_shards_and_the_likely_cause(small_dataset):
    stream = killing_stream(small_dataset)
    plan = EpochPlan(sequential_order(200), BATCH, 1, 0)
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        for _ in stream.epoch(plan):
            pass
    assert time.monotonic() - started < 20  # torch looks at its workers every 5 s while it waits
    message = str(err.value)
    match = re.match(expected_message_start(stream), message)
    assert match, message
    assert f"(batch {KILL_STEP + 1} of 25 of this pass, from {stream.where(KILL_STEP * BATCH)}). " in message
    assert message.endswith(
        "Most likely the kernel's OOM killer: memory ran out on the node or under the job's limit (dmesg or the "
        "job's log says so). Lower data.num_workers (now 2) or train.batch_size, or give the job more memory."
    )
    assert not multiprocessing.active_children()  # the other worker was shut down with the pass


def test_with_several_ranks_the_dead_worker_is_reported_and_the_pass_goes_on_with_stand_ins(small_dataset):
    """The rank must keep stepping with the others until they all stop on the failure together
    (distvit.engine.failures): every batch of the plan comes, real ones until the dead worker's, then zeros."""
    stream = killing_stream(small_dataset)
    memory = MemoryBatches(load_split(small_dataset, read_manifest(small_dataset), "train"))
    plan = EpochPlan(sequential_order(200), BATCH, 1, 0)
    reported: list[str] = []
    batches = [(batch, images.clone(), labels) for batch, images, labels in stream.epoch(plan, reported.append)]
    assert len(reported) == 1 and re.match(expected_message_start(stream), reported[0]), reported
    assert len(batches) == len(plan) == 25
    for (batch, images, labels), (_, want, want_labels) in zip(batches, memory.epoch(plan)):
        if batch.step < KILL_STEP:
            assert torch.equal(images, want) and torch.equal(labels, want_labels), batch.step
        else:
            assert images.shape == want.shape and not images.any() and not labels.any(), batch.step
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_workers_leave_stop_signals_to_their_rank(small_dataset, signum):
    """The launcher and Slurm signal a rank's whole process group: its workers must outlive the signal, so
    that the rank can finish its steps to the agreed stop and checkpoint."""
    manifest = read_manifest(small_dataset)
    memory = MemoryBatches(load_split(small_dataset, manifest, "train"))
    stream = StreamBatches(small_dataset, manifest, "train", 2, CPU)
    plan = EpochPlan(sequential_order(200), BATCH, 1, 0)
    expected = memory.epoch(plan)
    for batch, images, labels in stream.epoch(plan):
        if batch.step == 2:
            workers = multiprocessing.active_children()
            assert len(workers) == 2
            for worker in workers:
                os.kill(worker.pid, signum)
            time.sleep(0.5)
            assert all(worker.is_alive() for worker in workers)
        _, want, want_labels = next(expected)
        assert torch.equal(images, want) and torch.equal(labels, want_labels), batch.step


RANK_SCRIPT = """
import os, sys, time, torch, multiprocessing
from distvit.data.read.loader import StreamBatches
from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.read.ring import BatchRing
dataset = sys.argv[1]
stream = StreamBatches(dataset, read_manifest(dataset), "train", 2, torch.device("cpu"))
stream.ring = BatchRing(2, 8, stream.samples.sample_shape, 2)  # so small that the workers wait for a slot
batches = stream.epoch(EpochPlan(sequential_order(200), 8, 1, 0))
next(batches)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(120)  # the workers wait in the ring for a slot that nobody will release: not where torch looks
"""


def test_workers_end_when_their_rank_is_killed(small_dataset):
    workers: list[int] = []
    rank = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RANK_SCRIPT), str(small_dataset)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        workers += [int(pid) for pid in rank.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(1.0)
        rank.kill()
        rank.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in workers)
    finally:
        rank.kill()
        for pid in filter(_running, workers):  # a failed check leaves no orphan spinning behind
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is collected by init, maybe later)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
