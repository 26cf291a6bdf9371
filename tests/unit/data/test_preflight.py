"""distvit.data.preflight: missing, truncated and corrupted shards found before training."""

from __future__ import annotations

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.memory import load_split
from distvit.data.preflight import find_bad_shards, without_shards
from distvit.data.synthetic import prepare_synthetic
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
