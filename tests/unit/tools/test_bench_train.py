"""distvit.tools.bench_train: the in-memory synthetic splits it can train on (the benchmark itself runs in
tests/e2e/test_bench.py)."""

from __future__ import annotations

import torch

from distvit.data.manifest import read_manifest
from distvit.data.read.memory import load_split
from distvit.tools.bench_train import synthetic_splits


def test_synthetic_splits_in_memory(small_dataset):
    manifest, splits = synthetic_splits(12, 5, image_size=16, num_classes=4, seed=1)
    assert manifest.classes == [
        "horizontal_stripes",
        "vertical_stripes",
        "checkerboard",
        "rings",
    ] and manifest.image_size == (16, 16)
    assert {name: info.num_samples for name, info in manifest.splits.items()} == {"train": 12, "test": 5}
    assert splits["train"].images.shape == (12, 16, 16, 3) and splits["train"].images.dtype == torch.uint8
    assert torch.bincount(splits["train"].labels).tolist() == [3, 3, 3, 3]  # balanced
    assert torch.bincount(splits["test"].labels).tolist() == [2, 1, 1, 1]
    again = synthetic_splits(12, 5, image_size=16, num_classes=4, seed=1)[1]
    other = synthetic_splits(12, 5, image_size=16, num_classes=4, seed=2)[1]
    assert torch.equal(again["train"].images, splits["train"].images)
    assert not torch.equal(other["train"].images, splits["train"].images)
    # the same images and labels as `distvit prepare synthetic` writes (small_dataset: 200 / 101, seed 0)
    manifest, splits = synthetic_splits(200, 101)
    stored = read_manifest(small_dataset)
    assert manifest.classes == stored.classes
    for name in ("train", "test"):
        on_disk = load_split(small_dataset, stored, name)
        assert torch.equal(splits[name].images, on_disk.images) and torch.equal(splits[name].labels, on_disk.labels)
