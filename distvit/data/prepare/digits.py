"""A "digits-like" proxy dataset: the glyphs 0..9 drawn with random pose, weight, contrast, blur and noise.

It stands in for users' own data where a horizontal flip changes what an image means (handwritten
digits such as sklearn's 8x8 digits upscaled, text, many medical and industrial images): a mirrored 2,
3, 7 or 9 is no digit at all. Its manifest therefore says `"flip_safe": false`, always. Each image is
one digit rendered with Pillow's scalable default font (Pillow >= 10.1 with FreeType) at a random size
and stroke width, then rotated (about +-15 degrees), sheared, stretched, moved, blurred slightly and put
as light ink on a dark background of random brightness with pixel noise; so a small ViT learns it well
above chance, but not to 100% at once. Defaults: 1,438 train and 359 test images (sklearn digits'
1,797 split 80/20), 32 x 32 RGB.

Generation is a pure function of the seed (for one Pillow/FreeType build: the glyphs are rasterised
by FreeType) and fast: the default 1,797 images are drawn in under half a second on one core, and
written as PNG shards in about a second and a half.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from distvit.data.manifest import Manifest
from distvit.errors import DataError

CLASS_NAMES = [str(digit) for digit in range(10)]
NUM_CLASSES = len(CLASS_NAMES)
SUPERSAMPLE = 2  # glyphs are posed at twice the size, then box-reduced: smooth edges without aliasing
MAX_ROTATION = 15.0  # degrees
MAX_SHEAR = 0.3

if TYPE_CHECKING:
    from distvit.data.prepare.writer import StoredFormat


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the default font is a fixed bitmap
        font = None
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise DataError(
            "the digits dataset needs Pillow >= 10.1 built with FreeType (a scalable default font); "
            f"this is Pillow {Image.__version__}: upgrade it (pip install -U Pillow)."
        )
    return font


@functools.lru_cache(maxsize=None)
def _glyph(digit: int, font_size: int, stroke: int) -> Image.Image:
    """The digit in white on black ("L"), cropped to its ink."""
    font = _font(font_size)
    left, top, right, bottom = font.getbbox(str(digit), stroke_width=stroke)
    image = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(image).text((-left, -top), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return image


def _mask(digit: int, size: int, params: np.ndarray) -> np.ndarray:
    """One ink mask in [0, 1] (size x size, float32) for a row of `_pose` parameters."""
    font_size, stroke, height, angle, shear, aspect, shift_x, shift_y, blur = params
    glyph = _glyph(digit, int(font_size), int(stroke))
    big = size * SUPERSAMPLE
    scale = height * big / glyph.height  # glyph pixels -> output pixels
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    forward = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([scale * aspect, scale])
    inverse = np.linalg.inv(forward)
    centre_out = np.array([big / 2 + shift_x * big, big / 2 + shift_y * big])
    centre_in = np.array([glyph.width / 2, glyph.height / 2])
    offset = centre_in - inverse @ centre_out  # PIL maps each output pixel to the input: in = A @ out + offset
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    posed = glyph.transform((big, big), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)
    if blur > 0:
        posed = posed.filter(ImageFilter.GaussianBlur(float(blur) * SUPERSAMPLE))
    return np.asarray(posed.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _pose(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-image glyph parameters, one row each: font size, stroke width, height as a share of the image,
    rotation (degrees), shear, width/height stretch, shift x and y (share of the image), blur (pixels)."""
    font_size = rng.integers(14, 40, size=n)  # different sizes rasterise (hint) differently
    return np.stack(
        [
            font_size,
            np.floor(rng.uniform(0, 0.1, size=n) * font_size),  # stroke width: thin to bold, holes kept open
            rng.uniform(0.45, 0.8, size=n),
            rng.uniform(-MAX_ROTATION, MAX_ROTATION, size=n),
            rng.uniform(-MAX_SHEAR, MAX_SHEAR, size=n),
            rng.uniform(0.7, 1.3, size=n),
            rng.uniform(-0.12, 0.12, size=n),
            rng.uniform(-0.1, 0.1, size=n),
            rng.uniform(0.0, 0.7, size=n) * (rng.uniform(size=n) < 0.7),
        ],
        axis=1,
    )


def generate(num_samples: int, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x S x S x 3, int64 labels N): balanced digits 0..9 in a seeded random order."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_samples) % NUM_CLASSES)
    pose = _pose(rng, num_samples)
    masks = np.empty((num_samples, image_size, image_size), dtype=np.float32)
    for index, (label, params) in enumerate(zip(labels, pose)):
        masks[index] = _mask(int(label), image_size, params)
    # Light ink on a dark background; levels, contrast and a faint tint vary per image, never per class.
    background = rng.uniform(0, 80, size=(num_samples, 1, 1, 1))
    ink = np.minimum(background + rng.uniform(50, 230, size=(num_samples, 1, 1, 1)), 255)
    tint = rng.uniform(0.85, 1.0, size=(num_samples, 1, 1, 3))
    pixels = (background + (ink - background) * masks[..., None]) * tint
    pixels += rng.normal(0, 1, size=pixels.shape) * rng.uniform(2, 16, size=(num_samples, 1, 1, 1))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels.astype(np.int64)


WORKING_BYTES_PER_PIXEL = 80
"""Peak bytes `generate` holds per pixel of a split beside its output (float32 masks, float64 mixing and
noise): 73-75 measured with tracemalloc at 32-256 px."""


def generation_bytes(train_size: int, test_size: int, image_size: int) -> int:
    """About the most memory `prepare_digits` holds at once: both splits' uint8 images and labels (the
    train split is kept while the test split is generated) and the larger split's working arrays."""
    pixels = image_size * image_size
    return (train_size + test_size) * (3 * pixels + 8) + max(train_size, test_size) * pixels * WORKING_BYTES_PER_PIXEL


def prepare_digits(
    out_dir: str | os.PathLike,
    *,
    train_size: int = 1438,
    test_size: int = 359,
    image_size: int = 32,
    seed: int = 0,
    samples_per_shard: int = 5000,
    stored_format: StoredFormat | None = None,
) -> Manifest:
    """Generate train and test splits (independent seeds) and write them as shards + a manifest that
    marks them as not flip-safe."""
    from distvit.data.prepare.writer import write_generated  # webdataset; `generate` alone works without it

    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if value < NUM_CLASSES:
            raise ValueError(f"{name}={value} must be at least {NUM_CLASSES} (one image per digit)")
    train = generate(train_size, image_size, seed=seed * 2)
    test = generate(test_size, image_size, seed=seed * 2 + 1)
    return write_generated(
        out_dir,
        "digits",
        CLASS_NAMES,
        splits={"train": train, "test": test},
        source={
            "generator": "distvit.data.prepare.digits",
            "seed": seed,
            "train_size": train_size,
            "test_size": test_size,
            "image_size": image_size,
        },
        samples_per_shard=samples_per_shard,
        stored_format=stored_format,
        flip_safe=False,
    )
