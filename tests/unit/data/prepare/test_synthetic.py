"""distvit.data.prepare.synthetic: the generated images, and a prepared dataset read back exactly."""

from __future__ import annotations

import numpy as np
import torch

from distvit.data.manifest import read_manifest
from distvit.data.prepare.synthetic import CLASS_NAMES, generate, prepare_synthetic
from distvit.data.read.memory import load_split


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


def test_generation_memory_estimate_covers_the_measured_peak(tmp_path):
    """prepare refuses what would not fit by this estimate (tools.prepare): it must not be below the truth."""
    import tracemalloc

    from distvit.data.prepare.synthetic import generation_bytes

    tracemalloc.start()
    prepare_synthetic(tmp_path / "ds", train_size=400, test_size=100, image_size=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= generation_bytes(400, 100, 10, 64) <= 1.5 * peak


def test_prepare_refuses_what_this_host_cannot_generate_before_allocating(tmp_path, monkeypatch):
    """--image-size 100000 (or 16384 with the default split sizes) ended in a raw allocator error of
    terabytes; now the estimate is compared with the host's available memory first."""
    import pytest

    from distvit.cli import build_parser
    from distvit.data import node
    from distvit.data.prepare import synthetic
    from distvit.errors import DistvitError

    monkeypatch.setattr(node, "available_host_memory", lambda: 16 * 10**9)

    def generate(*args, **kwargs):
        raise AssertionError("generated")

    monkeypatch.setattr(synthetic, "generate", generate)
    args = build_parser().parse_args(["prepare", "synthetic", "--out", str(tmp_path / "ds"), "--image-size", "4096"])
    with pytest.raises(DistvitError) as error:
        args.action(args)
    assert str(error.value) == (
        "50000 + 10000 images of 4096 x 4096 px (--train-size, --test-size, --image-size) take about 11.4 TB of "
        "memory while they are generated, more than the 16.0 GB this host has available. Lower --image-size, "
        "--train-size or --test-size."
    )
    assert not (tmp_path / "ds").exists()
