"""`distvit bench decode`: decoding images stored at full size (224 px), per core and in total.

The same synthetic images are written as PNG shards and as JPEG shards (quality 95) in a scratch folder.
In one process, and so comparable on a noisy machine, it times:

- the raw decoders on one core: Pillow on the PNG bytes, Pillow and libjpeg-turbo (TorchCodec, else
  torchvision) on the JPEG bytes: the ceiling a reader can approach;
- the lesson's kind of pipeline for stored photos (an ImageFolder-style dataset: PIL open, RGB,
  `ToTensor`, `Normalize`) in a DataLoader with W workers;
- distvit's stream reader on the PNG and on the JPEG shards with W workers (uint8 batches delivered in
  the plan's order, the form the training device receives them in);
- with a GPU, the JPEG shards decoded in batches on it (`data.decode=device`: the workers only read).

for W = 0 (in the training process), 1 and the usable cores; per core = total / max(W, 1), and the
scaling efficiency from 1 to W workers.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distvit.data.images import decode_jpeg
from distvit.data.manifest import Manifest
from distvit.data.node import usable_cores
from distvit.data.plan import EpochPlan, epoch_order
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.prepare.writer import StoredFormat
from distvit.data.read.loader import StreamBatches
from distvit.tools.bench_data import images_per_second
from distvit.tools.lesson import IMAGENET_MEAN, IMAGENET_STD

HELD_BYTES_PER_PIXEL = 6
"""Bytes per stored pixel the benchmark holds beside the generation: the PNG bytes (up to 3 for the noisy
synthetic images), the JPEG bytes and their tensor copies."""


@dataclass
class DecodeResult:
    name: str
    workers: int
    images_per_sec: float
    bytes_per_image: float

    @property
    def per_core(self) -> float:
        return self.images_per_sec / max(self.workers, 1)


def _members(folder: Path, manifest: Manifest, suffix: str) -> list[bytes]:
    import tarfile

    payloads = []
    for shard in manifest.splits["train"].shards:
        with tarfile.open(folder / shard.name) as tar:
            payloads += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(suffix)]
    return payloads


def _rate(decode: Callable[[bytes], object], payloads: list[bytes], seconds: float = 1.0) -> float:
    """Images/s of `decode` over all of `payloads` (at least once, for about `seconds`), in this thread."""
    count, start = 0, time.perf_counter()
    while not count or time.perf_counter() - start < seconds:
        for payload in payloads:
            decode(payload)
        count += len(payloads)
    return count / (time.perf_counter() - start)


class _LessonPhotos(torch.utils.data.Dataset):
    """An ImageFolder-style dataset over encoded images: PIL open -> RGB -> ToTensor -> Normalize."""

    def __init__(self, payloads: list[bytes]):
        from torchvision import transforms

        self.payloads = payloads
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.payloads)

    def __getitem__(self, index: int):
        with Image.open(io.BytesIO(self.payloads[index])) as image:
            return self.transform(image.convert("RGB")), 0


def _lesson(payloads: list[bytes], workers: int, batch_size: int) -> Iterator:
    loader = torch.utils.data.DataLoader(
        _LessonPhotos(payloads),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    while True:
        yield from loader


def _stream(source: StreamBatches, batch_size: int) -> Iterator:
    epoch = 0
    while True:
        for _, images, _ in source.epoch(EpochPlan(epoch_order(len(source), 0, epoch), batch_size, 1, 0)):
            yield images
        epoch += 1


def bench_decode(
    images: int = 1536, stored_size: int = 224, batch_size: int = 64, steps: int = 20, device: str = "auto"
) -> dict:
    """Every case above; returns {"raw": [...], "pipelines": [...], "context": {...}}."""
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu"))
    scratch = Path(tempfile.mkdtemp(prefix="distvit-bench-decode-"))
    try:
        common = {"train_size": images, "test_size": 10, "image_size": stored_size, "samples_per_shard": 128}
        png = prepare_synthetic(scratch / "png", **common)
        jpeg = prepare_synthetic(scratch / "jpeg", **common, stored_format=StoredFormat("jpeg", 95))
        png_bytes, jpeg_bytes = _members(scratch / "png", png, ".png"), _members(scratch / "jpeg", jpeg, ".jpg")
        png_size, jpeg_size = np.mean([len(p) for p in png_bytes]), np.mean([len(p) for p in jpeg_bytes])

        def pillow(payload: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(payload)) as image:
                return np.asarray(image.convert("RGB"))

        # every image once per round, as a reader meets them (not a few cache-hot ones again and again)
        tensors = [torch.from_numpy(np.frombuffer(p, np.uint8).copy()) for p in jpeg_bytes]
        raw = [
            DecodeResult("Pillow, PNG", 1, _rate(pillow, png_bytes), png_size),
            DecodeResult("Pillow, JPEG", 1, _rate(pillow, jpeg_bytes), jpeg_size),
            DecodeResult("libjpeg-turbo (torch), JPEG", 1, _rate(decode_jpeg, tensors), jpeg_size),
        ]
        pipelines = []
        counts = sorted({0, 1, usable_cores()})  # 0: read and decoded in the training process itself
        for workers in counts:
            cases = [
                ("lesson-style: PIL + ToTensor + Normalize, JPEG", _lesson(jpeg_bytes, workers, batch_size), jpeg_size),
                (
                    "distvit stream, PNG shards",
                    _stream(StreamBatches(scratch / "png", png, "train", workers, target), batch_size),
                    png_size,
                ),
                (
                    "distvit stream, JPEG shards",
                    _stream(StreamBatches(scratch / "jpeg", jpeg, "train", workers, target), batch_size),
                    jpeg_size,
                ),
            ]
            if target.type == "cuda":
                device_decoded = StreamBatches(scratch / "jpeg", jpeg, "train", workers, target, decode="device")
                cases.append(
                    ("distvit stream, JPEG decoded on the GPU", _stream(device_decoded, batch_size), jpeg_size)
                )
            for name, batches, size in cases:
                rate = images_per_second(batches, warmup=2, steps=steps, device=target, batch_size=batch_size)
                pipelines.append(DecodeResult(name, workers, rate, size))
        context = {
            "images": images,
            "stored_size": stored_size,
            "batch_size": batch_size,
            "usable_cores": usable_cores(),
            "device": torch.cuda.get_device_name() if target.type == "cuda" else "cpu",
        }
        return {"raw": raw, "pipelines": pipelines, "context": context}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def format_decode(results: dict) -> str:
    context, raw = results["context"], results["raw"]
    turbo = raw[-1].images_per_sec
    lines = [
        f"distvit bench decode: {context['images']} synthetic images stored at {context['stored_size']} px, "
        f"batch {context['batch_size']}, {context['usable_cores']} usable cores, device {context['device']}",
        "raw decoders, one core:",
    ]
    lines += [f"  {r.name:<40} {r.images_per_sec:>8.0f} img/s  {r.bytes_per_image / 1e3:>6.1f} KB/image" for r in raw]
    lines.append(f"{'pipeline':<48} {'workers':>7} {'img/s':>8} {'per core':>9} {'of raw':>7} {'scaling':>8}")
    single = {r.name: r.images_per_sec for r in results["pipelines"] if r.workers == 1}
    for r in results["pipelines"]:
        scaling = f"{r.images_per_sec / (single[r.name] * r.workers):.2f}" if r.workers > 1 else "-"
        of_raw = f"{r.per_core / turbo:.2f}" if "JPEG shards" in r.name and "GPU" not in r.name else "-"
        lines.append(
            f"{r.name:<48} {r.workers:>7} {r.images_per_sec:>8.0f} {r.per_core:>9.0f} {of_raw:>7} {scaling:>8}"
        )
    return "\n".join(lines)


def as_json(results: dict) -> dict:
    return {
        "context": results["context"],
        "raw": [asdict(r) for r in results["raw"]],
        "pipelines": [asdict(r) for r in results["pipelines"]],
    }
