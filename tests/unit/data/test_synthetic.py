"""distvit.data.synthetic: the generated images, and a prepared dataset read back exactly."""

from __future__ import annotations

import numpy as np
import torch

from distvit.data.manifest import read_manifest
from distvit.data.memory import load_split
from distvit.data.synthetic import CLASS_NAMES, generate, prepare_synthetic


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
