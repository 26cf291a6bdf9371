"""distvit.data.read.memory: shards checked against the manifest before they are read into memory."""

from __future__ import annotations

import shutil

import pytest

from distvit.data.manifest import read_manifest, sha256_file
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.memory import load_split
from distvit.errors import DataError


def test_incomplete_or_damaged_dataset_is_refused(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=60, test_size=20, samples_per_shard=25)
    manifest = read_manifest(tmp_path / "ds")
    shard = tmp_path / "ds" / "train-00001.tar"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 512)
    with pytest.raises(DataError, match="train-00001.tar: .* bytes, the manifest says"):
        load_split(tmp_path / "ds", manifest, "train")
    shard.unlink()
    with pytest.raises(DataError, match="train-00001.tar: missing"):
        load_split(tmp_path / "ds", manifest, "train")
    with pytest.raises(DataError, match="has no split 'validation'. Available splits: train, test"):
        load_split(tmp_path / "ds", manifest, "validation")
    (tmp_path / "ds" / "manifest.json").unlink()
    with pytest.raises(DataError, match="prepare` did not finish"):
        read_manifest(tmp_path / "ds")


def test_shard_with_wrong_sample_count_is_refused(tmp_path):
    prepare_synthetic(tmp_path / "a", train_size=30, test_size=20, seed=0)
    prepare_synthetic(tmp_path / "b", train_size=40, test_size=20, seed=0)
    # same file name, other content: fix size and hash in the manifest to reach the count check
    shard = tmp_path / "a" / "train-00000.tar"
    shutil.copy(tmp_path / "b" / "train-00000.tar", shard)
    manifest = read_manifest(tmp_path / "a")
    manifest.splits["train"].shards[0].num_bytes = shard.stat().st_size
    manifest.splits["train"].shards[0].sha256 = sha256_file(shard)
    with pytest.raises(DataError, match="holds more samples than its manifest entry"):
        load_split(tmp_path / "a", manifest, "train")


def test_a_split_larger_than_the_hosts_memory_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    """A manifest claiming 16384 px images (the most it may) made memory mode allocate 161 GB for 200
    images; now the decoded size is compared with the host's available memory first."""
    import json

    import numpy as np

    import distvit.data.read.memory as memory

    prepare_synthetic(tmp_path / "ds", train_size=200, test_size=20)
    path = tmp_path / "ds" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["image_size"] = [16384, 16384]
    path.write_text(json.dumps(raw))
    monkeypatch.setattr(memory, "available_host_memory", lambda: 64 * 10**9, raising=False)

    def allocate(shape, dtype):
        raise AssertionError(f"allocated {np.prod(shape) / 1e9:.0f} GB")

    monkeypatch.setattr(memory.np, "empty", allocate)
    with pytest.raises(DataError) as error:
        load_split(tmp_path / "ds", read_manifest(tmp_path / "ds"), "train")
    assert str(error.value) == (
        f"{tmp_path / 'ds'}: split(s) 'train' decode to 161.1 GB (200 images of 16384 x 16384 x 3), more than "
        "the 64.0 GB of memory this host has available, and memory mode holds them decoded. Use data.mode=stream "
        "(decode from the shards as batches need them; `evaluate --mode stream`)."
    )
