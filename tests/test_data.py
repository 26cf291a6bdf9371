"""Synthetic dataset, shard writer, manifest and the in-memory reader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from distvit.data.manifest import read_manifest, sha256_file
from distvit.data.memory import load_split
from distvit.data.preflight import find_bad_shards, without_shards
from distvit.data.synthetic import CLASS_NAMES, generate, prepare_synthetic
from distvit.errors import DataError


def test_generate_is_balanced_seeded_and_not_class_sorted():
    images, labels = generate(1000, num_classes=10, image_size=32, seed=7)
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [100] * 10
    again, labels_again = generate(1000, num_classes=10, image_size=32, seed=7)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(generate(1000, seed=8)[0], images)
    assert (np.diff(labels) != 0).sum() > 500  # shuffled, not runs of one class


def test_classes_differ_by_structure_not_colour():
    """Mean colour carries almost no class information: a nearest-mean-colour classifier is near chance."""
    images, labels = generate(2000, seed=0)
    colour = images.reshape(len(images), -1, 3).mean(axis=1)
    centroids = np.stack([colour[labels == k].mean(axis=0) for k in range(10)])
    predicted = np.argmin(((colour[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == labels).mean() < 0.3


def test_round_trip_exact_pixels_and_labels(tmp_path):
    manifest = prepare_synthetic(tmp_path / "ds", train_size=130, test_size=21, samples_per_shard=50, seed=3)
    assert [s.num_samples for s in manifest.splits["train"].shards] == [50, 50, 30]
    assert manifest.classes == CLASS_NAMES
    reread = read_manifest(tmp_path / "ds")
    assert reread == manifest
    train = load_split(tmp_path / "ds", reread, "train")
    images, labels = generate(130, seed=6)  # train uses seed * 2
    assert torch.equal(train.images, torch.from_numpy(images))
    assert torch.equal(train.labels, torch.from_numpy(labels))
    histogram = np.sum([s.label_counts for s in manifest.splits["train"].shards], axis=0)
    assert histogram.tolist() == np.bincount(labels, minlength=10).tolist()
    assert not list((tmp_path / "ds").glob("*.tmp"))


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


def test_manifest_counts_must_add_up(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=30, test_size=20)
    path = tmp_path / "ds" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["num_samples"] = 31
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="says 31 samples but its shards hold 30"):
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


def test_killed_prepare_is_detected_and_redone(tmp_path):
    """A run killed mid-write leaves shards and a .tmp but no manifest: never read; the next run cleans up."""
    prepare_synthetic(tmp_path / "ds", train_size=60, test_size=20, samples_per_shard=25)
    (tmp_path / "ds" / "manifest.json").unlink()  # the writer removes it first, and writes it last
    (tmp_path / "ds" / "train-00003.tar.tmp").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="did not finish"):
        read_manifest(tmp_path / "ds")
    manifest = prepare_synthetic(tmp_path / "ds", train_size=60, test_size=20, samples_per_shard=25)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "manifest.json", "test-00000.tar", "train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert len(load_split(tmp_path / "ds", manifest, "train")) == 60
