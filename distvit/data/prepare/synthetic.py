"""A learnable synthetic image-classification dataset in CIFAR-10's shape, for offline demos and tests.

Each class is a family of patterns (stripes, rings, shapes ...) drawn with random colours, frequency,
phase, position, size and pixel noise, so a model must learn structure, not a pixel or a colour. All
families look the same under a horizontal flip, so flip augmentation never turns one class into another.
Generation is a pure function of the seed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from distvit.data.manifest import Manifest

CLASS_NAMES = [
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "rings",
    "disk",
    "square_outline",
    "plus",
    "x_cross",
    "dot_grid",
    "gradient",
]
MAX_CLASSES = len(CLASS_NAMES)
NOISE_STD = 12.0

if TYPE_CHECKING:
    from distvit.data.prepare.writer import StoredFormat


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    return rng.uniform(low, high, size=(n, 1, 1))


def _masks(label: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n foreground masks in [0, 1] of shape (n, size, size) for one class."""
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    scale = size / 32.0  # parameters below are in pixels at 32 px
    phase = _uniform(rng, 0, 2 * np.pi, n)
    cy = _uniform(rng, 0.35 * size, 0.65 * size, n)
    cx = _uniform(rng, 0.35 * size, 0.65 * size, n)
    dy, dx = yy[None] - cy, xx[None] - cx
    name = CLASS_NAMES[label]
    if name == "horizontal_stripes":
        period = _uniform(rng, 4, 10, n) * scale
        return (np.sin(2 * np.pi * yy[None] / period + phase) > 0).astype(np.float32)
    if name == "vertical_stripes":
        period = _uniform(rng, 4, 10, n) * scale
        return (np.sin(2 * np.pi * xx[None] / period + phase) > 0).astype(np.float32)
    if name == "checkerboard":
        period = _uniform(rng, 6, 14, n) * scale
        phase2 = _uniform(rng, 0, 2 * np.pi, n)
        wave = np.sin(2 * np.pi * xx[None] / period + phase) * np.sin(2 * np.pi * yy[None] / period + phase2)
        return (wave > 0).astype(np.float32)
    radius = np.sqrt(dx**2 + dy**2)
    if name == "rings":
        period = _uniform(rng, 6, 10, n) * scale
        return (np.sin(2 * np.pi * radius / period + phase) > 0).astype(np.float32)
    if name == "disk":
        r = _uniform(rng, 6, 12, n) * scale
        return (radius < r).astype(np.float32)
    if name == "square_outline":
        r = _uniform(rng, 7, 13, n) * scale
        width = _uniform(rng, 2, 3.5, n) * scale
        box = np.maximum(np.abs(dx), np.abs(dy))
        return ((box <= r) & (box >= r - width)).astype(np.float32)
    if name == "plus":
        r = _uniform(rng, 8, 14, n) * scale
        width = _uniform(rng, 1.5, 3, n) * scale
        arms = ((np.abs(dx) < width) & (np.abs(dy) < r)) | ((np.abs(dy) < width) & (np.abs(dx) < r))
        return arms.astype(np.float32)
    if name == "x_cross":
        r = _uniform(rng, 9, 15, n) * scale
        width = _uniform(rng, 1.5, 3, n) * scale
        diagonals = (np.abs(dx - dy) < width * 1.4) | (np.abs(dx + dy) < width * 1.4)
        return (diagonals & (np.maximum(np.abs(dx), np.abs(dy)) < r)).astype(np.float32)
    if name == "dot_grid":
        period = _uniform(rng, 7, 11, n) * scale
        dot = _uniform(rng, 2, 3, n) * scale
        gx = np.mod(xx[None] + phase * period, period) - period / 2
        gy = np.mod(yy[None] + phase * period, period) - period / 2
        return (gx**2 + gy**2 < dot**2).astype(np.float32)
    if name == "gradient":
        angle = _uniform(rng, 0, 2 * np.pi, n)
        ramp = (dx * np.cos(angle) + dy * np.sin(angle)) / size + 0.5
        return np.clip(ramp, 0, 1).astype(np.float32)
    raise AssertionError(name)


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB colours of random hue, the foreground clearly brighter (mean channel
    difference >= 60), so a pattern's polarity is fixed and its colours carry no class information."""
    first = rng.uniform(0, 255, size=(n, 3))
    second = rng.uniform(0, 255, size=(n, 3))
    for _ in range(100):
        close = np.abs(first.mean(axis=1) - second.mean(axis=1)) < 60
        if not close.any():
            break
        second[close] = rng.uniform(0, 255, size=(int(close.sum()), 3))
    swap = (first.mean(axis=1) > second.mean(axis=1))[:, None]
    return np.where(swap, second, first), np.where(swap, first, second)


def generate(
    num_samples: int, num_classes: int = 10, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x S x S x 3, int64 labels N): balanced classes in a seeded random order."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be between 2 and {MAX_CLASSES}, got {num_classes}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    images = np.empty((num_samples, image_size, image_size, 3), dtype=np.uint8)
    for label in range(num_classes):
        where = np.flatnonzero(labels == label)
        if where.size == 0:
            continue
        mask = _masks(label, where.size, image_size, rng)[..., None]
        background, foreground = _colours(rng, where.size)
        pixels = background[:, None, None, :] * (1 - mask) + foreground[:, None, None, :] * mask
        pixels += rng.normal(0, NOISE_STD, size=pixels.shape)
        images[where] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


WORKING_BYTES_PER_PIXEL = 100
"""Peak bytes `generate` holds per pixel of one class's images beside its output (float64 coordinates,
masks and colour mixing): 85-95 measured with tracemalloc at 32-256 px."""


def generation_bytes(train_size: int, test_size: int, num_classes: int, image_size: int) -> int:
    """About the most memory `prepare_synthetic` holds at once: both splits' uint8 images and labels
    (the train split is kept while the test split is generated) and one class's working arrays."""
    pixels = image_size * image_size
    largest_class = max(-(-train_size // num_classes), -(-test_size // num_classes))
    return (train_size + test_size) * (3 * pixels + 8) + largest_class * pixels * WORKING_BYTES_PER_PIXEL


def prepare_synthetic(
    out_dir: str | os.PathLike,
    *,
    train_size: int = 50_000,
    test_size: int = 10_000,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
    samples_per_shard: int = 5000,
    stored_format: StoredFormat | None = None,
    flip_safe: bool = True,
) -> Manifest:
    """Generate train and test splits (independent seeds) and write them as shards + manifest.
    `flip_safe=False` marks them as not flip-safe in the manifest (the patterns themselves are)."""
    from distvit.data.prepare.writer import write_generated  # webdataset; `generate` alone works without it

    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if value < num_classes:
            raise ValueError(f"{name}={value} must be at least num_classes={num_classes}")
    train = generate(train_size, num_classes, image_size, seed=seed * 2)
    test = generate(test_size, num_classes, image_size, seed=seed * 2 + 1)
    return write_generated(
        out_dir,
        "synthetic",
        CLASS_NAMES[:num_classes],
        splits={"train": train, "test": test},
        source={
            "generator": "distvit.data.prepare.synthetic",
            "seed": seed,
            "train_size": train_size,
            "test_size": test_size,
            "num_classes": num_classes,
            "image_size": image_size,
        },
        samples_per_shard=samples_per_shard,
        stored_format=stored_format,
        flip_safe=flip_safe,
    )
