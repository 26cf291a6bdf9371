"""distvit.tools.preflight: load_checked_config checks config, splits, subset, shards, model and run dir
before any rank starts; only one process per node hashes the shards."""

from __future__ import annotations

import shutil

import pytest

from distvit.data.manifest import read_manifest
from distvit.errors import ConfigError, DataError
from distvit.tools.preflight import is_local_leader, load_checked_config


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def _load(dataset, tmp_path, *overrides):
    return load_checked_config(None, [f"data.path={dataset}", f"run.dir={tmp_path / 'run'}", *overrides])


def test_a_valid_config_returns_config_manifest_and_no_bad_shards(small_dataset, tmp_path):
    cfg, manifest, bad_shards = _load(small_dataset, tmp_path, "data.train_subset=200", "train.epochs=3")
    assert bad_shards == {}
    assert cfg.data.path == str(small_dataset) and cfg.data.train_subset == 200 and cfg.train.epochs == 3
    assert {name: split.num_samples for name, split in manifest.splits.items()} == {"train": 200, "test": 101}
    assert manifest.num_classes == 10
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())  # created, nothing written


def test_a_subset_larger_than_the_split_names_data_train_subset(small_dataset, tmp_path):
    with pytest.raises(ConfigError) as caught:
        _load(small_dataset, tmp_path, "data.train_subset=201")
    assert str(caught.value) == (
        f"data.train_subset=201 is larger than split 'train' of {small_dataset} (200 images); "
        "choose at most 200, or 0 for all."
    )


@pytest.mark.parametrize("key", ["data.eval_split", "data.train_split"])
def test_a_split_the_manifest_lacks_names_its_key(small_dataset, tmp_path, key):
    with pytest.raises(DataError) as caught:
        _load(small_dataset, tmp_path, f"{key}=validation")
    assert str(caught.value) == (
        f"{key}='validation': dataset {small_dataset} has no split 'validation'. Available splits: train, test."
    )


def test_a_model_that_does_not_fit_the_dataset_is_refused(small_dataset, tmp_path):
    with pytest.raises(ConfigError, match="keeps deit_tiny_patch16_224's 1000-class head, but the dataset has 10"):
        _load(small_dataset, tmp_path, "surgery.head=keep")


def _copy_with_a_flipped_byte(dataset, tmp_path):
    """A copy of the dataset whose first test shard keeps its size but not its bytes."""
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    shard = sorted(copy.glob("test-*.tar"))[0]
    payload = bytearray(shard.read_bytes())
    payload[1000] ^= 0xFF
    shard.write_bytes(bytes(payload))
    return copy, shard.name


def test_corrupted_shards_stop_a_single_process_and_are_returned_under_a_launcher(small_dataset, tmp_path, monkeypatch):
    data, shard = _copy_with_a_flipped_byte(small_dataset, tmp_path)
    with pytest.raises(DataError) as caught:
        _load(data, tmp_path)
    assert str(caught.value) == (
        f"1 bad shard(s): {data / shard}: sha256 differs from the manifest (corrupted or changed). "
        "Prepare the dataset again, or set data.bad_shards=skip to train without them."
    )
    _, _, bad = _load(data, tmp_path, "data.bad_shards=skip")
    assert bad == {shard: "sha256 differs from the manifest (corrupted or changed)"}
    monkeypatch.setenv("WORLD_SIZE", "2")  # the ranks unite their findings first (engine), none fails alone
    assert _load(data, tmp_path)[2] == bad


def test_only_the_local_leader_hashes(small_dataset, tmp_path, monkeypatch):
    data, _ = _copy_with_a_flipped_byte(small_dataset, tmp_path)
    assert is_local_leader()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert is_local_leader()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_local_leader()
    assert _load(data, tmp_path)[2] == {}  # sizes only: the same-size corruption is the leader's to find
    shard = read_manifest(data).splits["train"].shards[0]
    (data / shard.name).write_bytes(b"short")
    assert _load(data, tmp_path, "data.bad_shards=skip")[2] == {
        shard.name: f"5 bytes, the manifest says {shard.num_bytes} (truncated or changed)"
    }


def test_a_global_batch_larger_than_the_training_images_is_refused(small_dataset, tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(small_dataset, tmp_path, "train.batch_size=201")
    assert str(err.value) == (
        f"train.batch_size=201 is larger than the 200 training images (split 'train' of {small_dataset}): "
        "every step would be mostly padding. Choose a global batch of at most 200."
    )
    with pytest.raises(ConfigError, match=r"^train.batch_size=128 is larger than the 100 training images "):
        _load(small_dataset, tmp_path, "data.train_subset=100")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    assert _load(small_dataset, tmp_path, "train.batch_size=200")[0].train.batch_size == 200


def test_an_empty_evaluation_split_is_refused(small_dataset, tmp_path):
    import json

    dataset = tmp_path / "ds"
    shutil.copytree(small_dataset, dataset)
    raw = json.loads((dataset / "manifest.json").read_text())
    raw["splits"]["val"] = {"name": "val", "num_samples": 0, "shards": []}
    (dataset / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError) as err:
        _load(dataset, tmp_path, "data.eval_split=val")
    assert str(err.value) == (
        f"data.eval_split='val' of {dataset} holds no images: every evaluation would count 0 of 0. "
        "Choose a split with images (test)."
    )


def test_a_nodes_other_ranks_wait_for_its_leaders_preflight_under_their_own_deadline(
    small_dataset, tmp_path, monkeypatch
):
    """Not train.timeout_s: the other local ranks wait for the leader's marker, then go on; without it
    they stop after data.preflight_timeout_s with a message saying what to do."""
    import threading
    import time

    from distvit.data.read.shard_checks import preflight_marker
    from distvit.errors import DataError

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    marker = preflight_marker()
    marker.unlink(missing_ok=True)
    threading.Timer(0.5, marker.touch).start()
    start = time.monotonic()
    _load(small_dataset, tmp_path)
    assert time.monotonic() - start >= 0.5
    marker.unlink()
    with pytest.raises(DataError, match="did not finish checking the shards .* data.preflight_timeout_s=1"):
        _load(small_dataset, tmp_path, "data.preflight_timeout_s=1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    _load(small_dataset, tmp_path)  # the leader: hashes, then marks the node's preflight done
    assert marker.exists()
    marker.unlink()
