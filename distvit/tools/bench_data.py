"""Benchmarks that print ratios against a baseline measured in the same process.

`distvit bench data` measures images per second delivered to the training device, ready for the model
(uint8 read, crop + flip augmentation, resize, normalise), by distvit's two batch sources and by the
lesson's pipeline: a torchvision-style CIFAR10 dataset (uint8 array -> PIL image -> transforms) with
`ToTensor` + `Normalize` (plus PIL `Resize` when the model input is larger) in a `DataLoader` with 2
workers. All three run on the same images in the same process, so the ratios hold on a noisy machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distvit.augment import PRESETS, Augmenter
from distvit.augment.transforms import BatchTransform
from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, epoch_order
from distvit.data.read.loader import MemoryBatches, StreamBatches
from distvit.data.read.memory import SplitTensors, load_split
from distvit.engine.timing import synchronize
from distvit.tools.lesson import IMAGENET_MEAN, IMAGENET_STD, endless, lesson_loader


@dataclass
class BenchResult:
    name: str
    images_per_sec: float
    batches: int
    seconds: float
    ratio_to_lesson: float = 0.0


def images_per_second(batches: Iterator, warmup: int, steps: int, device: torch.device, batch_size: int) -> float:
    """Images/s of `steps` batches of `batch_size` after `warmup` ones, the device synchronised around."""
    for _ in range(warmup):
        next(batches)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def _timed(batches: Iterator, warmup: int, steps: int, device: torch.device, batch_size: int, name: str) -> BenchResult:
    rate = images_per_second(batches, warmup, steps, device, batch_size)
    return BenchResult(name, rate, steps, steps * batch_size / rate)


def _distvit_batches(source, transform: BatchTransform, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    augment = Augmenter(PRESETS["crop_flip"], transform)
    epoch = 0
    while True:
        plan = EpochPlan(epoch_order(len(source), seed, epoch), batch_size, 1, 0)
        for batch, images, _ in source.epoch(plan):
            generator = torch.Generator().manual_seed(batch.step)
            yield augment(images, augment.sample(batch_size, tuple(images.shape[1:3]), generator))
        epoch += 1


def _lesson_batches(data: SplitTensors, img_size: int, batch_size: int, device: torch.device) -> Iterator:
    for images, _ in endless(lesson_loader(data, img_size, batch_size)):
        yield images.to(device)


def bench_data(
    dataset_dir: str,
    split: str = "train",
    batch_size: int = 256,
    steps: int = 40,
    warmup: int = 5,
    workers: int = 2,
    img_size: int = 32,
    device: str = "auto",
) -> list[BenchResult]:
    target = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    manifest = read_manifest(dataset_dir)
    data = load_split(dataset_dir, manifest, split)
    transform = BatchTransform((img_size, img_size), IMAGENET_MEAN, IMAGENET_STD)
    results = [
        _timed(
            _lesson_batches(data, img_size, batch_size, target),
            warmup,
            steps,
            target,
            batch_size,
            "lesson: torchvision-style dataset + PIL transforms, DataLoader(num_workers=2)",
        ),
        _timed(
            _distvit_batches(MemoryBatches(data.to(target)), transform, batch_size),
            warmup,
            steps,
            target,
            batch_size,
            f"distvit memory: uint8 on {target.type}, batched crop/flip/resize/normalise",
        ),
        _timed(
            _distvit_batches(StreamBatches(dataset_dir, manifest, split, workers, target), transform, batch_size),
            warmup,
            steps,
            target,
            batch_size,
            f"distvit stream: shards, {workers} decode workers, same transforms",
        ),
    ]
    for result in results:
        result.ratio_to_lesson = result.images_per_sec / results[0].images_per_sec
    return results


def format_results(results: list[BenchResult], header: str) -> str:
    lines = [header, f"{'pipeline':<88} {'images/s':>10} {'x lesson':>9}"]
    lines += [f"{r.name:<88} {r.images_per_sec:>10.0f} {r.ratio_to_lesson:>8.2f}x" for r in results]
    return "\n".join(lines)


def write_json(path: str, results: list[BenchResult], context: dict) -> None:
    Path(path).write_text(json.dumps({**context, "results": [asdict(r) for r in results]}, indent=1) + "\n")
