"""Test images: random RGB arrays and files written with Pillow."""

from __future__ import annotations

import numpy as np

RNG = np.random.default_rng(0)


def rgb(height=20, width=30):
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path
