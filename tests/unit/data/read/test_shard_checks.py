"""distvit.data.read.shard_checks: missing, truncated and corrupted shards found before training."""

from __future__ import annotations

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.memory import load_split
from distvit.data.read.shard_checks import find_bad_shards, without_shards
from distvit.errors import DataError


def test_preflight_finds_missing_truncated_and_corrupted_shards(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=100, test_size=20, samples_per_shard=25)
    manifest = read_manifest(tmp_path / "ds")
    ds = tmp_path / "ds"
    payload = bytearray((ds / "train-00000.tar").read_bytes())
    payload[2000] ^= 0xFF  # same size, one byte different
    (ds / "train-00000.tar").write_bytes(bytes(payload))
    (ds / "train-00001.tar").write_bytes((ds / "train-00001.tar").read_bytes()[:-512])
    (ds / "train-00002.tar").unlink()
    bad = find_bad_shards(ds, manifest, ["train", "test"], verify="sha256")
    assert bad == {
        "train-00000.tar": "sha256 differs from the manifest (corrupted or changed)",
        "train-00001.tar": f"{manifest.splits['train'].shards[1].num_bytes - 512} bytes, the manifest says "
        f"{manifest.splits['train'].shards[1].num_bytes} (truncated or changed)",
        "train-00002.tar": "missing",
    }
    assert set(find_bad_shards(ds, manifest, ["train"], verify="size")) == {"train-00001.tar", "train-00002.tar"}
    kept = without_shards(manifest, set(bad), ds)
    assert kept.splits["train"].num_samples == 25 and kept.splits["test"] == manifest.splits["test"]
    assert len(load_split(ds, kept, "train")) == 25
    with pytest.raises(DataError, match="every shard of split 'train'"):
        without_shards(manifest, {s.name for s in manifest.splits["train"].shards}, ds)


def test_hashing_is_parallel_and_skips_shards_verified_before(tmp_path, monkeypatch):
    """The second preflight (a requeue) hashes only the shard that changed since (its mtime moved)."""
    import os

    from distvit.data.read import shard_checks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    prepare_synthetic(tmp_path / "ds", train_size=100, test_size=20, samples_per_shard=25)
    ds, manifest = tmp_path / "ds", read_manifest(tmp_path / "ds")
    hashed = []
    real = shard_checks.sha256_file
    monkeypatch.setattr(shard_checks, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    assert find_bad_shards(ds, manifest, ["train", "test"], "sha256", workers=2) == {}
    assert sorted(hashed) == ["test-00000.tar", *(f"train-0000{i}.tar" for i in range(4))]
    assert shard_checks.hashing_estimate(ds, manifest, ["train", "test"])[0] == 0
    hashed.clear()
    os.utime(ds / "train-00002.tar")  # touched: no longer known to be the verified bytes
    assert find_bad_shards(ds, manifest, ["train", "test"], "sha256", workers=2) == {}
    assert hashed == ["train-00002.tar"]
    hashed.clear()
    payload = bytearray((ds / "train-00003.tar").read_bytes())
    payload[1500] ^= 0xFF
    (ds / "train-00003.tar").write_bytes(bytes(payload))
    assert find_bad_shards(ds, manifest, ["train"], "sha256") == {
        "train-00003.tar": "sha256 differs from the manifest (corrupted or changed)"
    }
    assert not list(ds.glob(".*"))  # the record lives in the cache folder, never in the dataset
