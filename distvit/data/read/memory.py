"""Reads a whole split from its shards into memory as uint8 tensors (small datasets such as CIFAR-10).

CIFAR-10's training split is 150 MB as uint8: holding it in memory (or on the GPU) removes decoding
from the training loop entirely. Every rank reads the full split, so any rank can serve any sample and
the epoch order can be planned globally (see `plan.py`).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distvit.data.images import decode_stored
from distvit.data.manifest import Manifest, SplitInfo, readable_bytes, sample_location
from distvit.data.node import available_host_memory
from distvit.data.read.shard_checks import shard_problem
from distvit.data.shard_format import IMAGE_MEMBERS, LABEL_MEMBER, parse_label
from distvit.errors import DataError


@dataclass
class SplitTensors:
    images: torch.Tensor
    """uint8, N x H x W x C, in the split's stored order."""
    labels: torch.Tensor
    """int64, N."""

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str) -> "SplitTensors":
        return SplitTensors(self.images.to(device), self.labels.to(device))


def check_shard_files(dataset_dir: str | os.PathLike, split: SplitInfo) -> list[Path]:
    """Every shard of the split exists with the manifest's size; returns their paths (the sha256 check is
    the preflight's, `distvit.data.read.shard_checks`)."""
    paths = []
    for shard in split.shards:
        problem = shard_problem(dataset_dir, shard.name, shard.num_bytes, shard.sha256, verify="size")
        if problem:
            raise DataError(f"shard {Path(dataset_dir) / shard.name}: {problem}. Prepare the dataset again.")
        paths.append(Path(dataset_dir) / shard.name)
    return paths


def decoded_bytes(manifest: Manifest, split_names: list[str]) -> int:
    """Bytes the splits take decoded as uint8 (0 when image sizes vary: they are never held so)."""
    if manifest.image_size is None:
        return 0
    height, width = manifest.image_size
    return sum(manifest.splits[name].num_samples for name in split_names) * height * width * manifest.channels


def check_fits_host(dataset_dir: str | os.PathLike, manifest: Manifest, split_names: list[str]) -> None:
    """Memory mode holds the splits decoded: a DataError before allocating when they exceed the host's
    available memory (numpy would otherwise reserve it lazily and the kernel kill the run mid-decode, or
    the allocator fail with a raw error)."""
    needed, available = decoded_bytes(manifest, split_names), available_host_memory()
    if available is None or needed <= available:
        return
    height, width = manifest.image_size
    images = sum(manifest.splits[name].num_samples for name in split_names)
    raise DataError(
        f"{dataset_dir}: split(s) {', '.join(repr(name) for name in split_names)} decode to {readable_bytes(needed)} "
        f"({images} images of {width} x {height} x {manifest.channels}), more than the {readable_bytes(available)} "
        "of memory this host has available, and memory mode holds them decoded. Use data.mode=stream (decode "
        "from the shards as batches need them; `evaluate --mode stream`)."
    )


def load_split(dataset_dir: str | os.PathLike, manifest: Manifest, split_name: str) -> SplitTensors:
    """Decode every sample of `split_name`, in stored order, checking counts against the manifest."""
    split = manifest.split(split_name, dataset_dir)
    if manifest.image_size is None:
        raise DataError(
            f"{dataset_dir}: its images have different sizes, so they cannot be held in memory as one "
            f"tensor. Prepare it again with --image-size S."
        )
    import webdataset as wds  # here, so that in-memory data (benchmarks) needs no webdataset

    check_fits_host(dataset_dir, manifest, [split_name])
    paths = check_shard_files(dataset_dir, split)  # sha256: see distvit.data.read.shard_checks
    height, width = manifest.image_size
    images = np.empty((split.num_samples, height, width, manifest.channels), dtype=np.uint8)
    labels = np.empty(split.num_samples, dtype=np.int64)
    index = 0
    for shard, path in zip(split.shards, paths):
        # One shard at a time, all of it, on every rank: no node or worker splitting here.
        stream = wds.WebDataset(
            str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        start = index
        try:
            for sample in stream:
                where = sample_location(path, sample["__key__"])
                if index >= split.num_samples or index - start >= shard.num_samples:
                    raise DataError(f"{path} holds more samples than its manifest entry ({shard.num_samples}).")
                member = next((ext for ext in IMAGE_MEMBERS if ext in sample), None)
                if member is None or LABEL_MEMBER not in sample:
                    raise DataError(f"{where} lacks its image (.png/.jpg) or .cls member. Prepare the dataset again.")
                images[index] = decode_stored(sample[member], manifest.channels, (height, width), where)
                labels[index] = parse_label(sample[LABEL_MEMBER], manifest.num_classes, where)
                index += 1
        except (tarfile.TarError, ValueError, OSError, UnicodeDecodeError) as err:  # not a tar, or a cut one
            raise DataError(
                f"{path} is not a readable tar shard ({type(err).__name__}: {str(err).splitlines()[0]}). "
                "Prepare (or fetch) the dataset again."
            ) from None
        if index - start != shard.num_samples:
            raise DataError(
                f"{path} holds {index - start} samples, its manifest entry says {shard.num_samples}. "
                f"Prepare the dataset again."
            )
    if labels.size and (labels.min() < 0 or labels.max() >= manifest.num_classes):
        raise DataError(f"split '{split_name}' of {dataset_dir} has labels outside [0, {manifest.num_classes}).")
    return SplitTensors(torch.from_numpy(images), torch.from_numpy(labels))
