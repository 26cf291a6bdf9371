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


def damage_stored_image(dataset, split: str, index: int) -> str:
    """Overwrite sample `index` of a dataset's split with undecodable bytes of the same size (the tar and
    its sizes stay valid: only decoding can tell). Returns the sample's key."""
    from distvit.data.manifest import read_manifest
    from distvit.data.read.loader import index_shards

    paths, locations = index_shards(dataset, read_manifest(dataset), split)
    damaged = locations[index]
    with open(paths[damaged.shard], "r+b") as shard:
        shard.seek(damaged.image_offset)
        shard.write(b"\x89PNG but not an image".ljust(damaged.image_size, b"\0"))
    return damaged.key
