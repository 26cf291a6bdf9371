"""Property test of the shard cache (distvit.data.read.cache): random sequences of runs against ONE cache folder.

Each example draws 3 to 6 runs. A run takes one of several datasets that share shard names (prepared
again with other content: the same byte sizes, or other sizes; a real PNG dataset and a copy with other
labels; another dataset's names, whose files become leftovers), often the one before (a requeue), a
limit (changed from run to run, now and then too small for a pass), one or two local ranks, a window, a
batch and a read-ahead, a remote (a folder, or a pipe: command that pauses midway), and ends in one of
three ways: its passes complete; it stops midway and closes (a requeue); or its process is SIGKILLed at
a random moment (a fork of this one), leaving what a kill leaves.

Invariants, on every run:
- every sample read through the cache is the current dataset's (image bytes and label, compared with
  what its tar files hold);
- the bytes of all files in the cache folder never exceed the run's limit (after the cache started,
  sampled every millisecond during the passes, after they end, and while a killed run was alive);
- a run the check before the first step (ShardFetcher.too_small) lets through completes on every rank:
  the fetcher never stops it as "too small" later (and when it does stop one, the check had refused it).

DISTVIT_PROPERTY_EXAMPLES sets the number of examples (default 40, ~30 s here); DISTVIT_PROPERTY_SEED
picks another series. A failure names the seed and the runs that led to it.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
import traceback

import numpy as np
import pytest

import distvit.data.read.fetch as fetch_module
from distvit.data.manifest import read_manifest
from distvit.data.plan import window_order
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.cache import ShardCache, folder_bytes, pass_required_bytes, shard_bytes
from distvit.errors import DataError
from tests.support.shard_sets import DiskWatch, fixed_size_dataset, relabelled, samples_of

EXAMPLES = int(os.environ.get("DISTVIT_PROPERTY_EXAMPLES", "40"))
SEED = int(os.environ.get("DISTVIT_PROPERTY_SEED", "0"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """name -> (folder, train shards, [(image bytes, label)] of every training sample)."""
    root = tmp_path_factory.mktemp("versions")
    for seed in range(3):  # the same names and byte sizes, other content
        fixed_size_dataset(root / f"fixed-{seed}", seed, shards=6, per_shard=8)
    fixed_size_dataset(root / "fixed-larger", 3, shards=6, per_shard=8, payload_bytes=1300)  # names kept, sizes not
    fixed_size_dataset(root / "other", 4, shards=5, per_shard=9, prefix="train-b")  # another dataset's names
    prepare_synthetic(root / "png-0", train_size=48, test_size=10, samples_per_shard=8)
    relabelled(root / "png-0", root / "png-1", shift=1)  # the same sizes, other labels
    found = {}
    for folder in sorted(root.iterdir()):
        manifest = read_manifest(folder)
        found[folder.name] = (folder, manifest.splits["train"].shards, samples_of(folder, manifest))
    return found


def _rank_batches(order: np.ndarray, batch: int, world: int, rank: int) -> np.ndarray:
    """The plan's slots of `rank` per step (distvit.data.plan.EpochPlan; padding reads sample 0), in numpy:
    a forked child must not start torch's thread pools."""
    steps = -(-len(order) // batch)
    padded = np.zeros(steps * batch, dtype=np.int64)
    padded[: len(order)] = order
    return padded.reshape(steps, world, batch // world)[:, rank, :]


def _needs(batches: np.ndarray, starts: np.ndarray, names: list[str]) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    for step, row in enumerate(batches):
        for shard in np.unique(np.searchsorted(starts, row, side="right") - 1):
            name = names[int(shard)]
            spans[name] = (spans[name][0] if name in spans else step, step)
    return spans


def _run(folder, dataset, run, stop_after=None, on_started=None) -> str:
    """One run as a trainer's ranks drive the cache; returns how it ended ('complete', 'stopped',
    'too small'). Raises AssertionError on a sample that is not the current dataset's. `on_started()` is
    called once the cache has started: from then on the run's limit holds (a lowered one included)."""
    source, shards, expected = dataset
    names = [shard.name for shard in shards]
    starts = np.cumsum([0] + [shard.num_samples for shard in shards])
    template = f"{source}/{{name}}"
    if run["remote"] == "slow pipe":  # a fetch in two halves with a pause: kills land in the middle of one
        template = f"pipe:head -c 2000 {template}; sleep 0.02; tail -c +2001 {template}"
    cache = ShardCache(str(folder), template, run["limit"], shards, 10)
    try:
        assert folder_bytes(folder) <= run["limit"], "over the limit right after the start"
        if on_started is not None:
            on_started()
        ranks, batch, lookahead = run["ranks"], run["batch"], run["lookahead"]
        orders = [
            window_order([s.num_samples for s in shards], run["seed"], epoch, run["window"]).numpy()
            for epoch in range(run["epochs"])
        ]
        sizes = np.array([shard_bytes(shard) for shard in shards])
        passes = [(f"epoch {e + 1}", order, batch, names, starts, 0) for e, order in enumerate(orders)]
        verdict = cache.fetcher.too_small(passes, ranks, list(range(ranks)), lookahead)
        needs = [pass_required_bytes(o, batch, ranks, list(range(ranks)), starts, sizes, lookahead) for o in orders]
        assert (verdict is None) == all(need + cache.fetcher.overhead <= run["limit"] for need, _ in needs)
        reporters = [cache.reporter]
        for rank in range(1, ranks):
            other = type(cache.reporter)(cache.session)
            other.rank = rank
            reporters.append(other)
        outcomes: list[str | BaseException] = [""] * ranks
        barrier = threading.Barrier(ranks)

        def rank_main(rank):
            try:
                for epoch, order in enumerate(orders):
                    batches = _rank_batches(order, batch, ranks, rank)
                    reporters[rank].begin(_needs(batches, starts, names), lookahead)
                    read = 0

                    def read_step(step):
                        for index in batches[step]:
                            shard = int(np.searchsorted(starts, index, side="right") - 1)
                            key, offset, size, _, label = cache.reader.index(names[shard])[index - starts[shard]]
                            got = (cache.reader.read(names[shard], offset, size), label)
                            assert got == expected[index], f"sample {index} ({names[shard]} {key}) is not the dataset's"

                    for step in range(min(lookahead + 1, len(batches))):
                        read_step(step)
                        read = step + 1
                    for step in range(len(batches)):
                        barrier.wait(timeout=60)  # the ranks step together (DDP)
                        cache.check()
                        reporters[rank].progress(step + 1)
                        if read < len(batches):
                            read_step(read)
                            read += 1
                        if stop_after is not None and (epoch, step) >= stop_after:
                            outcomes[rank] = "stopped"
                            return
                outcomes[rank] = "complete"
            except DataError as err:
                outcomes[rank] = "too small" if "is too small" in str(err) else err
                barrier.abort()
            except threading.BrokenBarrierError:
                outcomes[rank] = "broken"
            except BaseException as err:  # noqa: BLE001 - handed to the test's thread
                outcomes[rank] = err
                barrier.abort()

        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(ranks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        ended = {o for o in outcomes if o != "broken"}
        assert len(ended) == 1, outcomes
        outcome = ended.pop()
        if verdict is None:  # what the check before the first step lets through never fails later
            assert outcome == ("stopped" if stop_after else "complete"), (outcome, needs, cache.fetcher.overhead)
        # a pass too large may still get through here (the fetcher's own check is a backstop, and evicts and
        # fetches again what the conservative count holds at once); a trainer stops before its first step
        return outcome
    finally:
        cache.close()


def _killed(folder, dataset, run) -> None:
    """The run in a forked process, SIGKILLed after a random delay (or ended by itself first: then it must
    have ended well). The folder stays under the limit while it lives."""
    context = multiprocessing.get_context("fork")
    errors, started = context.Queue(), context.Event()

    def child():
        try:
            _run(folder, dataset, run, on_started=started.set)
        except BaseException:  # noqa: BLE001 - reported to the parent
            errors.put(traceback.format_exc())
            os._exit(3)
        os._exit(0)

    process = context.Process(target=child)
    process.start()
    disk, deadline = None, time.monotonic() + run["kill_after"]
    while process.is_alive() and time.monotonic() < deadline:
        if disk is None and started.is_set():  # the earlier run's limit holds until this one has started
            disk = DiskWatch(folder).start()
        time.sleep(0.001)
    if process.exitcode is None:
        os.kill(process.pid, signal.SIGKILL)
    process.join()
    peak = disk.stop() if disk is not None else 0
    if process.exitcode == 3:
        raise AssertionError(errors.get(timeout=5))
    assert process.exitcode in (0, -signal.SIGKILL), process.exitcode
    assert peak <= run["limit"], f"{peak} bytes on disk over the limit {run['limit']} while the killed run lived"


def _draw_run(rng: random.Random, datasets, before: dict | None) -> dict:
    name = before["dataset"] if before and rng.random() < 0.4 else rng.choice(sorted(datasets))  # a requeue
    shards = datasets[name][1]
    ranks = rng.choice([1, 1, 2])
    run = {
        "dataset": name,
        "ranks": ranks,
        "batch": ranks * rng.choice([2, 3, 4, 8]),
        "window": rng.choice([1, 2, 3]),
        "lookahead": rng.choice([0, 0, 1, 4]),
        "epochs": rng.choice([1, 2]),
        "seed": rng.randrange(1000),
        "end": rng.choices(["complete", "stop", "kill"], weights=[5, 1, 2])[0],
        "kill_after": rng.uniform(0.0, 0.2),
        "remote": rng.choice(["folder", "folder", "slow pipe"]),
    }
    biggest = max(shard_bytes(shard) for shard in shards)
    # from too small for a window (~2 shards at once) to everything at once, bookkeeping included
    run["limit"] = rng.randint(2, len(shards) + 2) * biggest + rng.choice([0, 8_000, 16_000, 40_000])
    return run


@pytest.mark.parametrize("example", range(EXAMPLES))
def test_the_cache_serves_the_current_dataset_within_its_limit_whatever_the_runs_before(
    datasets, tmp_path, example, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fetch_module, "BACKOFF_S", 0.01)
    rng = random.Random(SEED * 1_000_003 + example)
    folder = tmp_path / "cache"
    history = []
    try:
        for _ in range(rng.randint(3, 6)):
            run = _draw_run(rng, datasets, history[-1] if history else None)
            history.append(run)
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(run["ranks"]))
            dataset = datasets[run["dataset"]]
            if run["end"] == "kill":
                _killed(folder, dataset, run)
                continue
            disk = DiskWatch(folder)
            try:
                steps = -(-len(dataset[2]) // run["batch"])
                stop_after = (rng.randrange(run["epochs"]), rng.randrange(steps)) if run["end"] == "stop" else None
                _run(folder, dataset, run, stop_after, on_started=disk.start)
            finally:
                peak = disk.stop() if disk.running else 0
            assert peak <= run["limit"], f"{peak} bytes on disk, over the limit {run['limit']}"
    except BaseException as err:
        runs = "\n".join(str(run) for run in history)
        raise AssertionError(f"seed {SEED}, example {example}, after the runs:\n{runs}\n{err}") from err
