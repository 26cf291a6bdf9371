"""Where each sample of a tar shard lies: member offsets from the tar headers, labels checked.

Readers then seek straight to an image's bytes; nothing but the headers and the `.cls` members is read.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from distvit.data.manifest import sample_location
from distvit.data.shard_format import IMAGE_MEMBERS, LABEL_MEMBER, parse_label
from distvit.errors import DataError


@dataclass(frozen=True)
class SampleLocation:
    shard: int
    image_offset: int
    image_size: int
    image_ext: str
    label: int
    key: str = ""


def index_shard(path: Path, num_classes: int, num_samples: int, shard_index: int = 0) -> list[SampleLocation]:
    """Where each sample of one shard lies, from its tar headers, with its label (checked)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.rpartition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = member
    except (tarfile.TarError, OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path} is not a readable tar shard ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Prepare (or fetch) the dataset again."
        ) from None
    locations = []
    with open(path, "rb") as handle:
        for key in order:
            members = samples[key]
            ext = next((e for e in IMAGE_MEMBERS if e in members), None)
            where = sample_location(path, key)
            if ext is None or LABEL_MEMBER not in members:
                raise DataError(f"{where} lacks its image or .cls member. Prepare the dataset again.")
            handle.seek(members[LABEL_MEMBER].offset_data)
            label = parse_label(handle.read(members[LABEL_MEMBER].size), num_classes, where)
            image = members[ext]
            locations.append(SampleLocation(shard_index, image.offset_data, image.size, ext, label, key))
    if len(order) != num_samples:
        raise DataError(f"{path} holds {len(order)} samples, its manifest entry says {num_samples}.")
    return locations
