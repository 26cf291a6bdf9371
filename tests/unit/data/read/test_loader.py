"""Batch sources: the streamed reader returns exactly what the in-memory reader does, for any worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, epoch_order
from distvit.data.prepare.imagefolder import prepare_imagefolder
from distvit.data.read.loader import MemoryBatches, StreamBatches, fits_in_memory, open_batches
from distvit.data.read.memory import load_split

CPU = torch.device("cpu")


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on 2 cores, on purpose
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 3])
def test_stream_equals_memory_and_covers_the_epoch_once(small_dataset, num_workers, world_size):
    manifest = read_manifest(small_dataset)
    memory = MemoryBatches(load_split(small_dataset, manifest, "train"))
    stream = StreamBatches(small_dataset, manifest, "train", num_workers, CPU)
    order = epoch_order(len(memory), seed=0, epoch=3)
    seen, steps = [], []
    for rank in range(world_size):
        plan = EpochPlan(order, 12 * world_size, world_size, rank)
        count = 0
        for (batch, images, labels), (batch_s, images_s, labels_s) in zip(memory.epoch(plan), stream.epoch(plan)):
            assert torch.equal(batch.indices, batch_s.indices)
            assert torch.equal(images, images_s) and torch.equal(labels, labels_s)
            seen += batch.indices[batch.valid].tolist()
            count += 1
        steps.append(count)
    assert sorted(seen) == list(range(200)) and len(set(steps)) == 1


def test_stream_resizes_images_of_varying_size(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i, (h, w) in enumerate([(20, 30), (40, 25), (16, 16)]):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    manifest = prepare_imagefolder(root, tmp_path / "out", val_fraction=0.0).manifest
    assert manifest.image_size is None and not fits_in_memory(manifest, "train")
    source = open_batches(tmp_path / "out", manifest, "train", mode="auto", num_workers=0, device=CPU, resize_to=16)
    assert isinstance(source, StreamBatches)
    plan = EpochPlan(torch.arange(6), 4, 1, 0)
    shapes = [tuple(images.shape) for _, images, _ in source.epoch(plan)]
    assert shapes == [(4, 16, 16, 3), (4, 16, 16, 3)]  # last batch padded to the fixed shape


def test_auto_mode_picks_memory_for_small_uniform_data(small_dataset):
    manifest = read_manifest(small_dataset)
    assert isinstance(
        open_batches(small_dataset, manifest, "test", mode="auto", num_workers=0, device=CPU, resize_to=32),
        MemoryBatches,
    )
    assert isinstance(
        open_batches(small_dataset, manifest, "test", mode="stream", num_workers=0, device=CPU, resize_to=32),
        StreamBatches,
    )
