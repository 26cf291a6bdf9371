"""distvit.data.writer: reproducible shard bytes, replaced and interrupted output."""

from __future__ import annotations

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.memory import load_split
from distvit.data.synthetic import prepare_synthetic
from distvit.errors import DataError


def test_same_input_gives_same_bytes(tmp_path):
    first = prepare_synthetic(tmp_path / "a", train_size=60, test_size=20, seed=1)
    second = prepare_synthetic(tmp_path / "b", train_size=60, test_size=20, seed=1)
    assert [s.sha256 for s in first.splits["train"].shards] == [s.sha256 for s in second.splits["train"].shards]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_rerun_replaces_previous_output(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=200, test_size=20, samples_per_shard=50)
    prepare_synthetic(tmp_path / "ds", train_size=60, test_size=20, samples_per_shard=50)
    assert sorted(p.name for p in (tmp_path / "ds").glob("train-*.tar")) == ["train-00000.tar", "train-00001.tar"]
    assert len(load_split(tmp_path / "ds", read_manifest(tmp_path / "ds"), "train")) == 60


def test_killed_prepare_is_detected_and_redone(tmp_path):
    """A run killed mid-write leaves shards and a .tmp but no manifest: never read; the next run cleans up."""
    prepare_synthetic(tmp_path / "ds", train_size=60, test_size=20, samples_per_shard=25)
    (tmp_path / "ds" / "manifest.json").unlink()  # the writer removes it first, and writes it last
    (tmp_path / "ds" / "train-00003.tar.tmp").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="did not finish"):
        read_manifest(tmp_path / "ds")
    manifest = prepare_synthetic(tmp_path / "ds", train_size=60, test_size=20, samples_per_shard=25)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "manifest.json",
        "test-00000.tar",
        "train-00000.tar",
        "train-00001.tar",
        "train-00002.tar",
    ]
    assert len(load_split(tmp_path / "ds", manifest, "train")) == 60
