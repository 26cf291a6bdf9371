"""The shard format, as writers and readers both know it: a sample is the tar members `<key>.png` or
`<key>.jpg` (its image, as stored) and `<key>.cls` (its class index, as ASCII text); the manifest
(distvit.data.manifest) lists the shards of each split with their sample counts, sizes and hashes."""

from __future__ import annotations

from distvit.errors import DataError

IMAGE_MEMBERS = ("png", "jpg")
"""The image member's extensions, in the order a reader looks for them."""
LABEL_MEMBER = "cls"


def label_payload(label: int) -> bytes:
    """What a writer stores as a sample's LABEL_MEMBER."""
    return str(label).encode()


def parse_label(payload: bytes, num_classes: int, where: str) -> int:
    """A sample's .cls member: a class index, as text, in [0, num_classes); else a DataError naming it.
    Checked whether or not the shard hashes were (data.verify=size reads only sizes)."""
    text = payload.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not text.isascii() or int(text) >= num_classes:
        raise DataError(
            f"{where}: label {text[:20]!r} is not a class index from 0 to {num_classes - 1}. The shard is damaged "
            "or from another dataset: prepare (or fetch) the dataset again."
        )
    return int(text)
