"""distvit.data.read.cache and the window order: shards streamed from a remote through a bounded cache."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import distvit.data.read.cache as cache_module
from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, epoch_order, sequential_order, window_order
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.cache import (
    ShardCache,
    cache_file_name,
    check_cache_dir,
    folder_bytes,
    open_cache_dir,
    pass_required_bytes,
    required_bytes,
    shard_bytes,
)
from distvit.data.read.fetch import FetchPolicy
from distvit.data.read.loader import CachedShardSamples, StreamBatches
from distvit.errors import DataError
from tests.support.disks import small_tmpfs
from tests.support.helpers import REPO, subprocess_env
from tests.support.shard_sets import DiskWatch, relabelled


@pytest.fixture(autouse=True)
def _own_verified_record(tmp_path, monkeypatch):
    """Each test its own record of verified files (kept under XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A dataset in shards of 10 samples (the 'remote': a folder, its template a plain path)."""
    folder = tmp_path_factory.mktemp("remote") / "ds"
    prepare_synthetic(folder, train_size=60, test_size=25, samples_per_shard=10)
    return folder


def _cache(remote, folder, limit, split="train", policy=FetchPolicy()):
    manifest = read_manifest(remote)
    shards = manifest.splits[split].shards
    return ShardCache(str(folder), f"{remote}/{{name}}", limit, shards, manifest.num_classes, policy)


def _read_all(batches, plan):
    images, labels = zip(*[(image, label) for _, image, label in batches.epoch(plan)])
    return torch.cat(images), torch.cat(labels)


def _stream(remote, cache, workers=0):
    return StreamBatches(remote, read_manifest(remote), "train", workers, torch.device("cpu"), cache=cache)


def test_window_order_is_a_permutation_of_whole_shard_windows_fixed_by_seed_and_epoch():
    sizes = [10, 10, 7, 10, 3]
    order = window_order(sizes, seed=5, epoch=2, window=2).numpy()
    assert sorted(order) == list(range(40))
    assert np.array_equal(order, window_order(sizes, 5, 2, 2).numpy())
    assert not np.array_equal(order, window_order(sizes, 5, 3, 2).numpy())
    starts = np.cumsum([0, *sizes])
    shard = np.searchsorted(starts, order, side="right") - 1
    first_window = set(shard[: sizes[shard[0]] + sizes[[s for s in shard if s != shard[0]][0]]])
    assert len(first_window) == 2  # the first window holds exactly two whole shards
    assert not np.array_equal(order[:17], np.sort(order[:17]))  # and is shuffled inside
    assert np.array_equal(np.sort(window_order(sizes, 5, 2, window=5).numpy()), np.arange(40))


def test_required_bytes_counts_what_is_in_use_and_read_ahead():
    needs = {"a": [(0, 1)], "b": [(1, 3)], "c": [(3, 4), (2, 2)]}
    sizes = {"a": 100, "b": 10, "c": 1}
    assert required_bytes(needs, sizes, lookahead=0) == (110, 1)
    assert required_bytes(needs, sizes, lookahead=2) == (111, 0)  # c is read ahead from step 0


@pytest.mark.parametrize("seed", range(40))
def test_a_pass_need_worked_out_from_the_order_is_what_the_ranks_publish(remote, seed):
    """pass_required_bytes (the check before the first step, from the order alone) equals what the
    fetcher computes from the needs the node's ranks publish (CachedShardSamples.needs of their plans)."""
    rng = np.random.default_rng(seed)
    shards = read_manifest(remote).splits["train"].shards
    samples = CachedShardSamples(None, shards, None)
    world = int(rng.choice([1, 2, 4]))
    batch = world * int(rng.integers(1, 8))
    node = sorted(rng.choice(world, size=int(rng.integers(1, world + 1)), replace=False).tolist())
    order = window_order([10] * 6, seed, 0, int(rng.integers(1, 4))) if seed % 2 else epoch_order(60, seed, 1)
    start, lookahead = int(rng.integers(0, 30)), int(rng.integers(0, 5))
    sizes = {shard.name: int(rng.integers(1, 1000)) for shard in shards}
    needs: dict[str, list] = {}
    for rank in node:
        for name, span in samples.needs(list(EpochPlan(order, batch, world, rank, start).batches())).items():
            needs.setdefault(name, []).append(span)
    expected = required_bytes(needs, sizes, lookahead)
    size_array = np.array([sizes[shard.name] for shard in shards])
    got = pass_required_bytes(order.numpy(), batch, world, node, samples.starts, size_array, lookahead, start)
    assert got[0] == expected[0]


def test_a_folder_with_files_of_the_users_is_never_a_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files distvit did not write \\(notes.txt\\)"):
        open_cache_dir(tmp_path)
    open_cache_dir(tmp_path / "new")
    open_cache_dir(tmp_path / "new")  # distvit's own (marked): adopted again
    (tmp_path / "new" / "train-00000.tar").write_bytes(b"the user's")
    with pytest.raises(DataError, match="holds files distvit did not write \\(train-00000.tar\\)"):
        open_cache_dir(tmp_path / "new")
    assert (tmp_path / "new" / "train-00000.tar").read_bytes() == b"the user's"


def test_cache_dir_naming_a_file_is_one_error_naming_the_key(tmp_path, remote):
    (tmp_path / "cache").write_text("not a folder")
    for check in (check_cache_dir, open_cache_dir, lambda folder: _cache(remote, folder, 10**7)):
        with pytest.raises(DataError, match=r"data.cache_dir='.*/cache' is a file, not a folder"):
            check(tmp_path / "cache")
    assert (tmp_path / "cache").read_text() == "not a folder"


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_through_the_cache_reads_what_the_local_shards_hold(remote, tmp_path, workers):
    manifest = read_manifest(remote)
    plan = EpochPlan(epoch_order(60, 0, 0), 12, 1, 0)
    local = _read_all(StreamBatches(remote, manifest, "train", 0, torch.device("cpu")), plan)
    cache = _cache(remote, tmp_path / "cache", limit=10**7)
    try:
        through_cache = StreamBatches(tmp_path, manifest, "train", workers, torch.device("cpu"), cache=cache)
        streamed = _read_all(through_cache, plan)
        assert torch.equal(local[0], streamed[0]) and torch.equal(local[1], streamed[1])
        assert cache.stats()["fetched"] == 6 and cache.stats()["peak_bytes"] <= 10**7
    finally:
        cache.close()
    again = _cache(remote, tmp_path / "cache", limit=10**7)  # a requeue: the verified shards stay
    try:
        assert again.stats()["reused"] == 6
    finally:
        again.close()


def test_a_small_cache_evicts_and_never_goes_over_its_limit_on_disk(remote, tmp_path):
    manifest = read_manifest(remote)
    shard_bytes_ = manifest.splits["train"].shards[0].num_bytes
    limit = 3 * (shard_bytes_ + 6000)
    cache = _cache(remote, tmp_path / "cache", limit)
    try:
        batches = StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=cache)
        order = window_order([10] * 6, 0, 0, 1)
        with DiskWatch(tmp_path / "cache") as disk:
            images, _ = _read_all(batches, EpochPlan(order, 10, 1, 0))
        assert images.shape[0] == 60
        stats = cache.stats()
        assert stats["evicted"] >= 3 and stats["peak_bytes"] <= limit
        assert 0 < disk.peak <= limit, (disk.peak, limit)
    finally:
        cache.close()


def test_a_cache_too_small_for_a_pass_is_one_clear_error(remote, tmp_path):
    """Global order: every shard is read from the first steps to the last; the limit holds two shards."""
    manifest = read_manifest(remote)
    cache = _cache(remote, tmp_path / "cache", limit=2 * shard_bytes(manifest.splits["train"].shards[0]) + 20_000)
    try:
        batches = StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=cache)
        with pytest.raises(DataError) as caught:
            _read_all(batches, EpochPlan(epoch_order(60, 0, 0), 12, 1, 0))
    finally:
        cache.close()
    message = str(caught.value)
    assert message.startswith(f"data.cache_limit={cache.fetcher.limit} bytes is too small: this pass needs ")
    assert "Raise data.cache_limit to at least" in message
    # a resume refuses a changed order: the message never proposes one as the way out
    assert "(for a new run, a smaller data.shuffle_window also lowers it)" in message
    assert "or lower data.shuffle_window" not in message


def test_a_shard_that_arrives_changed_stops_with_the_reason(remote, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(remote, changed)
    name = read_manifest(changed).splits["train"].shards[2].name
    with open(changed / name, "r+b") as shard:
        shard.seek(700)
        shard.write(b"X")
    manifest = read_manifest(changed)
    cache = _cache(changed, tmp_path / "cache", limit=10**7)
    try:
        batches = StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=cache)
        with pytest.raises(DataError, match=f"{name} does not match the sha256 in the manifest"):
            _read_all(batches, EpochPlan(epoch_order(60, 0, 0), 12, 1, 0))
    finally:
        cache.close()
    assert not list((tmp_path / "cache").glob(name[:-4] + ".*"))  # never kept


def test_one_cache_folder_serves_one_run_at_a_time(remote, tmp_path):
    first = _cache(remote, tmp_path / "cache", limit=10**7)
    try:
        with pytest.raises(DataError, match=r"is in use by another distvit run \(pid \d+ on "):
            _cache(remote, tmp_path / "cache", limit=10**7)
    finally:
        first.close()


def test_a_full_cache_left_by_an_earlier_run_makes_room_for_what_is_needed_first(remote, tmp_path):
    """Every shard present from a run with a larger limit, then a smaller limit: the shard needed last
    goes first, and the pass completes (no wait for room that never comes)."""
    manifest = read_manifest(remote)
    order = window_order([10] * 6, 0, 0, 1)
    first = _cache(remote, tmp_path / "cache", limit=10**7)
    try:
        _read_all(
            StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=first), EpochPlan(order, 10, 1, 0)
        )
    finally:
        first.close()
    limit = 4 * (manifest.splits["train"].shards[0].num_bytes + 6000)
    smaller = _cache(remote, tmp_path / "cache", limit)
    try:
        assert smaller.stats()["reused"] == 4  # what the new limit holds of the six left
        assert folder_bytes(tmp_path / "cache") <= limit
        batches = StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=smaller)
        images, _ = _read_all(batches, EpochPlan(window_order([10] * 6, 0, 1, 1), 10, 1, 0))
        assert images.shape[0] == 60 and smaller.stats()["peak_bytes"] <= limit
    finally:
        smaller.close()


# --- content, not names (issue 21, finding 1) ---


def test_a_dataset_prepared_again_under_the_same_names_and_sizes_is_fetched_and_read_anew(remote, tmp_path):
    """Other labels, the same shard names and byte sizes: the old shards are never used for the new dataset."""
    again = tmp_path / "again"
    relabelled(remote, again, shift=3)
    plan = EpochPlan(sequential_order(60), 12, 1, 0)
    first = _cache(remote, tmp_path / "cache", limit=10**7)
    try:
        _, old_labels = _read_all(_stream(remote, first), plan)
    finally:
        first.close()
    second = _cache(again, tmp_path / "cache", limit=10**7)
    try:
        assert second.stats()["reused"] == 0
        images, labels = _read_all(_stream(again, second), plan)
        assert second.stats()["fetched"] == 6
    finally:
        second.close()
    local_images, local_labels = _read_all(
        StreamBatches(again, read_manifest(again), "train", 0, torch.device("cpu")), plan
    )
    assert torch.equal(labels, local_labels) and torch.equal(images, local_images)
    assert torch.equal(labels, (old_labels + 3) % 10)


def test_a_dataset_prepared_again_with_other_sizes_is_read_as_it_is_now(remote, tmp_path):
    """Other content and sizes under the same names: no reader uses the old shards' sample index."""
    other = tmp_path / "other"
    prepare_synthetic(other, train_size=60, test_size=25, samples_per_shard=10, seed=7)
    plan = EpochPlan(epoch_order(60, 0, 0), 12, 1, 0)
    for source in (remote, other, remote):
        cache = _cache(source, tmp_path / "cache", limit=10**7)
        try:
            streamed = _read_all(_stream(source, cache, workers=2), plan)
        finally:
            cache.close()
        local = _read_all(StreamBatches(source, read_manifest(source), "train", 0, torch.device("cpu")), plan)
        assert torch.equal(streamed[0], local[0]) and torch.equal(streamed[1], local[1])


def test_a_cached_shard_is_hashed_unless_unchanged_since_it_matched(remote, tmp_path, monkeypatch):
    """The record of verified files spares the hashing of what did not change; a shard changed in the
    cache (its size kept) is hashed, found different and fetched again."""
    plan = EpochPlan(sequential_order(60), 12, 1, 0)
    first = _cache(remote, tmp_path / "cache", limit=10**7)
    try:
        _read_all(_stream(remote, first), plan)
    finally:
        first.close()
    hashed = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    shards = read_manifest(remote).splits["train"].shards
    touched, damaged = (tmp_path / "cache" / cache_file_name(shard) for shard in shards[1:3])
    os.utime(touched, ns=(1, 1))  # the same bytes, another mtime
    payload = bytearray(damaged.read_bytes())
    label = payload.index(b".cls") + 512 - payload.index(b".cls") % 512  # the first label's data block
    payload[label : label + 1] = b"9" if payload[label : label + 1] != b"9" else b"8"
    damaged.write_bytes(bytes(payload))
    cache = _cache(remote, tmp_path / "cache", limit=10**7)
    try:
        assert cache.stats()["reused"] == 4 and hashed == []  # unchanged since they matched: not hashed
        streamed = _read_all(_stream(remote, cache), plan)
        assert sorted(hashed) == sorted([touched.name, damaged.name])
        assert cache.stats()["reused"] == 5 and cache.stats()["fetched"] == 1
    finally:
        cache.close()
    local = _read_all(StreamBatches(remote, read_manifest(remote), "train", 0, torch.device("cpu")), plan)
    assert torch.equal(streamed[1], local[1]) and torch.equal(streamed[0], local[0])


def test_a_reader_never_opens_what_the_fetcher_has_not_vouched_for_in_this_run(remote, tmp_path, monkeypatch):
    """Shards and indexes of an earlier run are in the folder, but this run's fetcher has not vouched for
    them: a reader (another local rank) waits for the vouch instead of reading them."""
    first = _cache(remote, tmp_path / "cache", limit=10**7)
    try:
        _read_all(_stream(remote, first), EpochPlan(sequential_order(60), 12, 1, 0))
    finally:
        first.close()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(cache_module, "READER_WAIT_S", 0.3)
    reader_only = _cache(remote, tmp_path / "cache", limit=10**7, policy=FetchPolicy(0.01, 0.01, 0))
    assert reader_only.fetcher is None
    reader_only.reader.wait_s = 0.3
    name = read_manifest(remote).splits["train"].shards[0].name
    with pytest.raises(DataError, match=f"shard {name} did not reach the cache .* within 0 s"):
        reader_only.reader.index(name)


# --- the limit counts every byte in the folder (finding 5) ---


def test_another_datasets_leftovers_count_against_the_limit_and_go_first(remote, tmp_path):
    other = tmp_path / "other"
    prepare_synthetic(other, train_size=60, test_size=25, samples_per_shard=10, seed=5)
    plan = EpochPlan(sequential_order(60), 10, 1, 0)
    first = _cache(other, tmp_path / "cache", limit=10**7)
    try:
        _read_all(_stream(other, first), plan)
    finally:
        first.close()
    leftovers = {p.name for p in (tmp_path / "cache").glob("*.tar*")}
    assert len(leftovers) == 12  # six shards and their indexes
    shards = read_manifest(remote).splits["train"].shards
    limit = 4 * shard_bytes(shards[0]) + 20_000
    assert folder_bytes(tmp_path / "cache") > limit
    cache = _cache(remote, tmp_path / "cache", limit)
    try:
        assert folder_bytes(tmp_path / "cache") <= limit
        with DiskWatch(tmp_path / "cache") as disk:
            _read_all(_stream(remote, cache), EpochPlan(window_order([10] * 6, 0, 0, 1), 10, 1, 0))
        assert disk.peak <= limit, (disk.peak, limit)
        assert cache.stats()["leftovers_removed"] == 12 and cache.stats()["fetched"] == 6
    finally:
        cache.close()
    assert not leftovers & {p.name for p in (tmp_path / "cache").iterdir()}


# --- the cache deletes only names it recorded (finding 14) ---


def test_the_cache_deletes_only_its_own_files(remote, tmp_path):
    """Names that merely look like the cache's (a `NAME.<pid>.tmp`, a `session-<digits>` folder) in distvit's
    own cache are not deleted: the folder is refused, naming them. What a killed fetcher left (its
    partial shard, its session folder: recorded before they were created) goes at the next start."""
    users = tmp_path / "users"
    (users / "session-notes").mkdir(parents=True)
    with pytest.raises(DataError, match="holds files distvit did not write \\(session-notes\\)"):
        open_cache_dir(users)
    folder = tmp_path / "cache"
    _cache(remote, folder, limit=10**7).close()
    name = read_manifest(remote).splits["train"].shards[0].name
    (folder / f"{name}.4242.tmp").write_bytes(b"not distvit's")
    (folder / "session-1").mkdir()
    (folder / "session-1" / "keep.txt").write_text("not distvit's either")
    with pytest.raises(DataError, match=rf"holds files distvit did not write \(session-1, {name}.4242.tmp\)"):
        _cache(remote, folder, limit=10**7)
    assert (folder / f"{name}.4242.tmp").read_bytes() == b"not distvit's"
    assert (folder / "session-1" / "keep.txt").read_text() == "not distvit's either"
    shutil.rmtree(folder / "session-1")
    (folder / f"{name}.4242.tmp").unlink()
    killed = _killed_mid_fetch(remote, folder)
    assert killed["part"].exists() and killed["session"].is_dir()
    (killed["session"] / "notes.txt").write_text("put there by hand")  # distvit's folder, not distvit's file
    with pytest.raises(DataError, match=rf"{killed['session']} holds files distvit did not write \(notes.txt\)"):
        _cache(remote, folder, limit=10**7)
    assert (killed["session"] / "notes.txt").read_text() == "put there by hand"
    (killed["session"] / "notes.txt").unlink()
    cache = _cache(remote, folder, limit=10**7)
    cache.close()
    assert not killed["part"].exists() and not killed["session"].exists()


SLOW_FETCH = """
import sys, time
from distvit.data.read.cache import ShardCache
from distvit.data.manifest import read_manifest

remote, folder = sys.argv[1], sys.argv[2]
manifest = read_manifest(remote)
shards = manifest.splits["train"].shards
first = shards[0].name
# half of the first shard at once, then nothing: the fetcher sits in the middle of its fetch
template = f"pipe:head -c 5000 {remote}/{{name}}; sleep 20"
cache = ShardCache(folder, template, 10**7, shards, manifest.num_classes)
cache.reporter.begin({first: (0, 0)}, lookahead=0)
print("begun", flush=True)
time.sleep(60)
"""


def _killed_mid_fetch(remote, folder):
    """Run a fetcher in another process, SIGKILL it in the middle of a fetch; what it left behind."""
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_FETCH, str(remote), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert process.stdout.readline().strip() == "begun"
        shard = read_manifest(remote).splits["train"].shards[0]
        part = folder / (cache_file_name(shard) + ".part")
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size == 5000) and time.monotonic() < deadline:
            time.sleep(0.01)
        session = folder / f"session-{process.pid}"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return {"part": part, "session": session}


# --- every pass checked before the first step (finding 6) ---


def _sources(remote, cache, batch, window, epochs_seed=0, workers=0):
    """What check_passes reads of a DataSources."""
    manifest = read_manifest(remote)
    sizes = [shard.num_samples for shard in manifest.splits["train"].shards]
    stream = SimpleNamespace(
        samples=CachedShardSamples(cache.reader, manifest.splits["train"].shards, None), num_workers=workers
    )
    evaluation = SimpleNamespace(
        samples=CachedShardSamples(cache.reader, manifest.splits["test"].shards, None), num_workers=workers
    )
    return SimpleNamespace(
        epoch_order=lambda epoch: window_order(sizes, epochs_seed, epoch, window),
        batch_size=batch,
        world=1,
        rank=0,
        train=stream,
        eval=evaluation,
    )


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Shards of unequal byte sizes (10 samples and one of 5): epochs pair them differently in windows."""
    folder = tmp_path_factory.mktemp("uneven") / "ds"
    prepare_synthetic(folder, train_size=65, test_size=20, samples_per_shard=10)
    return folder


def test_every_epochs_need_is_checked_before_the_first_step(uneven, tmp_path):
    """Epoch 1 fits the limit, a later one does not: the run stops before its first step, on every rank
    alike (the verdict of local rank 0 handed round), naming that epoch; not at the start of that epoch."""
    manifest = read_manifest(uneven)
    shards = {shard.name: shard for split in ("train", "test") for shard in manifest.splits[split].shards}
    train = manifest.splits["train"].shards
    starts = np.cumsum([0] + [shard.num_samples for shard in train])
    sizes = np.array([shard_bytes(shard) for shard in train])
    needs = [
        pass_required_bytes(
            window_order([s.num_samples for s in train], 0, epoch, 2).numpy(), 10, 1, [0], starts, sizes, 0
        )[0]
        for epoch in range(6)
    ]
    later = next(epoch for epoch in range(1, 6) if needs[epoch] > needs[0])
    probe = ShardCache(str(tmp_path / "probe"), f"{uneven}/{{name}}", 10**7, list(shards.values()), 10)
    overhead = probe.fetcher.overhead
    probe.close()
    limit = needs[0] + overhead
    cache = ShardCache(str(tmp_path / "cache"), f"{uneven}/{{name}}", limit, list(shards.values()), 10)
    agreed = []
    sources = _sources(uneven, cache, batch=10, window=2)
    with pytest.raises(DataError) as caught:
        cache.check_passes(sources, 6, 5, lambda verdicts: agreed.append(verdicts) or verdicts)
    assert str(caught.value).startswith(
        f"data.cache_limit={limit} bytes is too small: epoch {later + 1} needs {needs[later]} bytes of shards at once"
    )
    assert agreed and agreed[0][0] == str(caught.value)
    assert cache.fetcher._stop.is_set()  # closed: the folder's lock is free for the next run
    fits = ShardCache(str(tmp_path / "cache"), f"{uneven}/{{name}}", max(needs) + overhead, list(shards.values()), 10)
    try:
        fits.check_passes(_sources(uneven, fits, batch=10, window=2), 6, 5, lambda verdicts: verdicts)
    finally:
        fits.close()


def test_another_ranks_verdict_stops_this_rank_too(remote, tmp_path, monkeypatch):
    """A rank that is not its node's first computes nothing and raises what the others found."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cache = _cache(remote, tmp_path / "cache", 10**7)
    message = "data.cache_limit=5 bytes is too small: epoch 3 needs ..."
    with pytest.raises(DataError, match="epoch 3 needs"):
        cache.check_passes(_sources(remote, cache, 12, 1), 4, 5, lambda verdicts: [message, *verdicts])
    cache.check_passes(_sources(remote, cache, 12, 1), 4, 5, lambda verdicts: [None, *verdicts])


# --- failures reach the readers at once; a disk too small is named (finding 12) ---


def test_a_disk_too_small_for_the_limit_is_one_error_naming_the_folder_and_its_free_space(remote, tmp_path):
    with small_tmpfs(tmp_path / "disk", 1) as disk:
        with pytest.raises(DataError) as caught:
            _cache(remote, disk / "cache", limit=10**7)
    message = str(caught.value)
    assert f"data.cache_limit=10000000 bytes does not fit on the disk of data.cache_dir='{disk}/cache'" in message
    free = int(message.split(": ")[1].split(" bytes are free there")[0])
    assert 0 < free <= 1 << 20


@pytest.mark.parametrize("left", [0, 16 << 10], ids=["full", "room-for-the-ledger-only"])
def test_a_full_disk_in_the_fetcher_reaches_the_readers_at_once(remote, tmp_path, left):
    """The disk fills up (another program) after the cache started: the fetcher's failure (writing its
    ledger, or the shard) goes into its pre-allocated error file and a waiting reader raises it within a
    fraction of a second, naming the file that could not be written and the free space there."""
    with small_tmpfs(tmp_path / "disk", 2) as disk:
        cache = _cache(remote, disk / "cache", limit=1 << 20)
        try:
            filler = disk / "filler"
            with open(filler, "wb", buffering=0) as handle:
                try:
                    while True:
                        handle.write(b"\0" * 4096)
                except OSError:
                    pass
                handle.truncate(max(0, handle.tell() - left))
            shards = read_manifest(remote).splits["train"].shards
            started = time.monotonic()
            with pytest.raises(DataError) as caught:  # a full disk refuses this rank's position file too
                cache.reporter.begin({shards[0].name: (0, 0)}, lookahead=0)
                cache.reader.index(shards[0].name)
            waited = time.monotonic() - started
        finally:
            cache.close()
    message = str(caught.value)
    assert waited < 1.0, waited
    assert "No space left on device" in message and f"{disk}/cache" in message and "MB free there" in message


def test_a_server_that_never_answers_is_one_error_for_every_reader_within_the_time_limits(
    remote, tmp_path, monkeypatch
):
    monkeypatch.setattr("distvit.data.read.fetch.BACKOFF_S", 0.05)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does), never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    manifest = read_manifest(remote)
    shards = manifest.splits["train"].shards
    policy = FetchPolicy(connect_s=2.0, stall_s=0.3, retries=2)
    cache = ShardCache(str(tmp_path / "cache"), f"{url}/{{name}}", 10**7, shards, 10, policy)
    try:
        cache.reporter.begin({shards[0].name: (0, 0)}, lookahead=0)
        started = time.monotonic()
        with pytest.raises(DataError) as caught:
            cache.reader.index(shards[0].name)
        assert time.monotonic() - started < 3.0
    finally:
        cache.close()
        silent.close()
    assert str(caught.value) == (
        f"could not fetch shard {shards[0].name} from {url}/{shards[0].name} (3 tries, each: no answer within "
        "0.3 s). The source sent nothing for data.fetch_stall_s=0.3 s: check it, or raise data.fetch_stall_s for "
        "a slow one."
    )


def test_closing_the_cache_calls_off_a_fetch_under_way(remote, tmp_path):
    pid_file = tmp_path / "pid"
    shards = read_manifest(remote).splits["train"].shards
    template = f"pipe:echo $$ > {pid_file}; exec sleep 30 #{{name}}"
    cache = ShardCache(str(tmp_path / "cache"), template, 10**7, shards, 10, FetchPolicy(30.0, 60.0, 3))
    cache.reporter.begin({shards[0].name: (0, 0)}, lookahead=0)
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    cache.close()
    assert time.monotonic() - started < 2.0
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert not list((tmp_path / "cache").glob("*.part"))


def test_the_config_command_refuses_a_cache_dir_that_is_a_file_in_one_line(remote, tmp_path):
    from tests.support.helpers import run_cli

    (tmp_path / "cache").write_text("a file")
    result = run_cli(
        [
            "config",
            "--config",
            "configs/demo.yaml",
            f"data.path={tmp_path}/manifest",
            f"data.remote={remote}/{{name}}",
            f"data.cache_dir={tmp_path}/cache",
            "data.cache_limit=10000000",
            f"run.dir={tmp_path}/run",
            "train.batch_size=30",
        ]
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"distvit: error: data.cache_dir='{tmp_path}/cache' is a file, not a folder: set data.cache_dir to a folder "
        "of its own (new or empty) for the shard cache."
    ]
