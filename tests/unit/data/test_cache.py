"""distvit.data.cache and the window order: shards streamed from a remote through a bounded cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from distvit.data.cache import ShardCache, open_cache_dir, required_bytes
from distvit.data.loader import StreamBatches
from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, epoch_order, window_order
from distvit.data.synthetic import prepare_synthetic
from distvit.errors import DataError


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A dataset in shards of 10 samples (the 'remote': a folder, read through webdataset's gopen)."""
    folder = tmp_path_factory.mktemp("remote") / "ds"
    prepare_synthetic(folder, train_size=60, test_size=25, samples_per_shard=10)
    return folder


def _cache(remote, folder, limit, split="train"):
    manifest = read_manifest(remote)
    return ShardCache(str(folder), f"{remote}/{{name}}", limit, manifest.splits[split].shards, manifest.num_classes)


def _read_all(batches, plan):
    images, labels = zip(*[(image, label) for _, image, label in batches.epoch(plan)])
    return torch.cat(images), torch.cat(labels)


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


def test_a_folder_with_files_of_the_users_is_never_a_cache(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files distvit did not write \\(notes.txt\\)"):
        open_cache_dir(tmp_path)
    open_cache_dir(tmp_path / "new")
    (tmp_path / "new" / "train-00000.tar").write_bytes(b"fetched")
    open_cache_dir(tmp_path / "new")  # distvit's own (marked): adopted again


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


def test_a_small_cache_evicts_and_never_goes_over_its_limit(remote, tmp_path):
    manifest = read_manifest(remote)
    shard_bytes = manifest.splits["train"].shards[0].num_bytes
    limit = 3 * (shard_bytes + 6000)
    cache = _cache(remote, tmp_path / "cache", limit)
    try:
        batches = StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=cache)
        order = window_order([10] * 6, 0, 0, 1)
        images, _ = _read_all(batches, EpochPlan(order, 10, 1, 0))
        assert images.shape[0] == 60
        stats = cache.stats()
        assert stats["evicted"] >= 3 and stats["peak_bytes"] <= limit
    finally:
        cache.close()


def test_a_cache_too_small_for_a_pass_is_one_clear_error(remote, tmp_path):
    manifest = read_manifest(remote)
    cache = _cache(remote, tmp_path / "cache", limit=1000)
    try:
        batches = StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=cache)
        with pytest.raises(DataError, match=r"data.cache_limit=1000 bytes is too small: .* at least \d+"):
            _read_all(batches, EpochPlan(epoch_order(60, 0, 0), 12, 1, 0))
    finally:
        cache.close()


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
    assert not (tmp_path / "cache" / name).exists()  # never kept


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
        batches = StreamBatches(tmp_path, manifest, "train", 0, torch.device("cpu"), cache=smaller)
        images, _ = _read_all(batches, EpochPlan(window_order([10] * 6, 0, 1, 1), 10, 1, 0))
        assert images.shape[0] == 60 and smaller.stats()["peak_bytes"] <= limit
    finally:
        smaller.close()


def test_the_cache_deletes_only_its_own_files(remote, tmp_path):
    """A user's folder that merely looks like a cache's (a `session-...` folder) is refused, not adopted; in
    distvit's own cache only a killed fetch's temporary file and earlier launches' position folders go."""
    users = tmp_path / "users"
    (users / "session-notes").mkdir(parents=True)
    with pytest.raises(DataError, match="holds files distvit did not write \\(session-notes\\)"):
        open_cache_dir(users)
    folder = tmp_path / "cache"
    _cache(remote, folder, limit=10**7).close()
    name = read_manifest(remote).splits["train"].shards[0].name
    (folder / f"{name}.4242.tmp").write_bytes(b"half a fetch")
    (folder / "session-1").mkdir()
    (folder / "session-mine").mkdir()
    (folder / "session-mine" / "keep.txt").write_text("not distvit's")
    _cache(remote, folder, limit=10**7).close()
    assert not (folder / f"{name}.4242.tmp").exists() and not (folder / "session-1").exists()
    assert (folder / "session-mine" / "keep.txt").read_text() == "not distvit's"
