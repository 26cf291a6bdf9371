"""Datasets prepared again under the same shard names (the case a cache keyed by name gets wrong): copies
with other labels and the same byte sizes, and small datasets of fixed-size samples written directly;
and a watch of the bytes a cache folder holds."""

from __future__ import annotations

import dataclasses
import io
import random
import tarfile
import threading
import time
from pathlib import Path

from distvit.data.manifest import Manifest, ShardInfo, SplitInfo, read_manifest, sha256_file, write_manifest
from distvit.data.read.cache import folder_bytes


def relabelled(source: Path, target: Path, shift: int = 1) -> Manifest:
    """A copy of the dataset at `source` with every label moved by `shift` (mod the classes): the same
    shard names, member sizes and so byte sizes, other content (and sha256)."""
    manifest = read_manifest(source)
    target.mkdir(parents=True)
    splits = {}
    for split_name, split in manifest.splits.items():
        shards = []
        for shard in split.shards:
            counts = [0] * manifest.num_classes
            with (
                tarfile.open(source / shard.name) as old,
                tarfile.open(target / shard.name, "w", format=old.format) as new,
            ):
                for member in old.getmembers():
                    payload = old.extractfile(member).read()
                    if member.name.endswith(".cls"):
                        label = (int(payload) + shift) % manifest.num_classes
                        counts[label] += 1
                        payload = str(label).encode().ljust(len(payload))
                    new.addfile(member, io.BytesIO(payload))
            assert (target / shard.name).stat().st_size == shard.num_bytes
            shards.append(dataclasses.replace(shard, sha256=sha256_file(target / shard.name), label_counts=counts))
        splits[split_name] = SplitInfo(split_name, split.num_samples, shards)
    relabelled_manifest = dataclasses.replace(manifest, splits=splits)
    write_manifest(target, relabelled_manifest)
    return relabelled_manifest


def fixed_size_dataset(
    folder: Path, seed: int, shards: int, per_shard: int, payload_bytes: int = 700, prefix: str = "train"
) -> Manifest:
    """A 'train' split of `shards` shards of `per_shard` samples whose image members are `payload_bytes`
    random bytes (never decoded by the cache's readers) with random labels: every seed gives the same
    shard names and byte sizes, and other content."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    infos = []
    for index in range(shards):
        name = f"{prefix}-{index:05d}.tar"
        counts = [0] * 10
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in range(per_shard):
                label = rng.randrange(10)
                counts[label] += 1
                key = f"{index:05d}{sample:04d}"
                for ext, payload in (("png", rng.randbytes(payload_bytes)), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        path = folder / name
        infos.append(ShardInfo(name, per_shard, path.stat().st_size, sha256_file(path), counts))
    manifest = Manifest(
        dataset=f"fixed-{seed}",
        classes=[str(c) for c in range(10)],
        image_size=None,
        channels=3,
        splits={"train": SplitInfo("train", shards * per_shard, infos)},
    )
    write_manifest(folder, manifest)
    return manifest


def samples_of(folder: Path, manifest: Manifest, split: str = "train") -> list[tuple[bytes, int]]:
    """(image bytes, label) of every sample of the split, in the split's order, read from the tar files."""
    samples = []
    for shard in manifest.splits[split].shards:
        with tarfile.open(folder / shard.name) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.rpartition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for parts in members.values():
            image = parts.get("png", parts.get("jpg"))
            samples.append((image, int(parts["cls"])))
    return samples


class DiskWatch:
    """The most bytes a folder held, sampled every millisecond while running (`start`/`stop`, or as a
    context manager: `peak` after the block)."""

    def __init__(self, folder):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> DiskWatch:
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.folder))
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, folder_bytes(self.folder))
        return self.peak

    def __enter__(self) -> DiskWatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
