"""Batches for a rank, following the epoch plan, from memory or streamed from the shards.

Both sources yield `(RankBatch, images, labels)` with uint8 N x H x W x C images on the training device,
for exactly the slots of the plan, so the exactly-once and equal-steps guarantees of `plan.py` hold for
both, for any number of loader workers.

- `MemoryBatches`: the whole split decoded once into a tensor (on the GPU when there is one).
- `StreamBatches`: random access into local tar shards through an index of member offsets built from the
  tar headers; decoding runs in DataLoader worker processes, `num_workers` batches ahead of the loop.
  Order is preserved: a DataLoader over a batch sampler returns batches in sampler order.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distvit.data.devices import to_device
from distvit.data.images import resize_and_crop
from distvit.data.manifest import Manifest
from distvit.data.memory import IMAGE_MEMBERS, SplitTensors, check_shard_files, load_split
from distvit.data.plan import EpochPlan, RankBatch
from distvit.errors import DataError

Batch = tuple[RankBatch, torch.Tensor, torch.Tensor]


class MemoryBatches:
    def __init__(self, data: SplitTensors):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def epoch(self, plan: EpochPlan) -> Iterator[Batch]:
        device = self.data.images.device
        for batch in plan.batches():
            indices = to_device(batch.indices, device)
            yield batch, self.data.images[indices], self.data.labels[indices]


@dataclass(frozen=True)
class SampleLocation:
    shard: int
    image_offset: int
    image_size: int
    image_ext: str
    label: int


def index_shards(
    dataset_dir: str | os.PathLike, manifest: Manifest, split_name: str
) -> tuple[list[Path], list[SampleLocation]]:
    """Where each sample of the split lies: tar headers give member offsets (no data is read but labels)."""
    split = manifest.split(split_name, dataset_dir)
    paths = check_shard_files(dataset_dir, split)
    locations: list[SampleLocation] = []
    for shard_index, (path, info) in enumerate(zip(paths, split.shards)):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.rpartition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = member
            with open(path, "rb") as handle:
                for key in order:
                    members = samples[key]
                    ext = next((e for e in IMAGE_MEMBERS if e in members), None)
                    if ext is None or "cls" not in members:
                        raise DataError(
                            f"{path} sample {key} lacks its image or .cls member. Prepare the dataset again."
                        )
                    handle.seek(members["cls"].offset_data)
                    label = int(handle.read(members["cls"].size))
                    image = members[ext]
                    locations.append(SampleLocation(shard_index, image.offset_data, image.size, ext, label))
        if len(order) != info.num_samples:
            raise DataError(f"{path} holds {len(order)} samples, its manifest entry says {info.num_samples}.")
    return paths, locations


class ShardSamples(torch.utils.data.Dataset):
    """Map-style view of a split's shards: item i is (uint8 H x W x C tensor, label) of sample i."""

    def __init__(self, paths: list[Path], locations: list[SampleLocation], resize_to: int | None):
        self.paths = paths
        self.shards = np.array([loc.shard for loc in locations], dtype=np.int32)
        self.offsets = np.array([loc.image_offset for loc in locations], dtype=np.int64)
        self.sizes = np.array([loc.image_size for loc in locations], dtype=np.int64)
        self.labels = torch.tensor([loc.label for loc in locations], dtype=torch.int64)
        self.resize_to = resize_to
        self._handles: dict[int, object] = {}  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        shard = int(self.shards[index])
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.paths[shard], "rb")
        handle.seek(int(self.offsets[index]))
        return handle.read(int(self.sizes[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.read(index))) as image:
            array = np.array(image.convert("RGB"))  # a writable copy, as torch wants
        if self.resize_to and array.shape[:2] != (self.resize_to, self.resize_to):
            array = resize_and_crop(array, self.resize_to)
        return torch.from_numpy(np.ascontiguousarray(array)), int(self.labels[index])

    def __getstate__(self):  # file handles do not travel to worker processes
        return {**self.__dict__, "_handles": {}}


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)


class StreamBatches:
    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        manifest: Manifest,
        split: str,
        num_workers: int,
        device: torch.device,
        resize_to: int | None = None,
    ):
        paths, locations = index_shards(dataset_dir, manifest, split)
        # Images of varying stored size cannot be stacked: bring each to the model's size in the worker.
        self.samples = ShardSamples(paths, locations, resize_to if manifest.image_size is None else None)
        self.num_workers = num_workers
        self.device = device

    def __len__(self) -> int:
        return len(self.samples)

    def epoch(self, plan: EpochPlan) -> Iterator[Batch]:
        batches = list(plan.batches())
        loader = torch.utils.data.DataLoader(
            self.samples,
            batch_sampler=[batch.indices.tolist() for batch in batches],
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers else None,
        )
        for batch, (images, labels) in zip(batches, loader):
            yield batch, images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def open_batches(
    dataset_dir: str | os.PathLike,
    manifest: Manifest,
    split: str,
    mode: str,
    num_workers: int,
    device: torch.device,
    resize_to: int,
) -> MemoryBatches | StreamBatches:
    """`mode`: 'memory', 'stream', or 'auto' (memory when the decoded split fits `MEMORY_LIMIT_BYTES`)."""
    if mode == "auto":
        mode = "memory" if fits_in_memory(manifest, split) else "stream"
    if mode == "memory":
        return MemoryBatches(load_split(dataset_dir, manifest, split).to(device))
    return StreamBatches(dataset_dir, manifest, split, num_workers, device, resize_to)


MEMORY_LIMIT_BYTES = 4 << 30


def fits_in_memory(manifest: Manifest, split: str) -> bool:
    if manifest.image_size is None:
        return False
    height, width = manifest.image_size
    return manifest.splits[split].num_samples * height * width * manifest.channels <= MEMORY_LIMIT_BYTES
