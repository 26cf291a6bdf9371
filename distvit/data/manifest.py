"""The dataset manifest: what `distvit prepare` wrote, and the only way readers learn about shards.

A dataset folder holds webdataset tar shards plus `manifest.json`, written last and atomically: a folder
without a manifest is incomplete and is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from distvit.errors import DataError
from distvit.fileio import atomic_write_bytes, file_digest

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "distvit-webdataset"
FORMAT_VERSION = 1
SAFE_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar")


@dataclass
class ShardInfo:
    name: str
    """File name relative to the dataset folder."""
    num_samples: int
    num_bytes: int
    sha256: str
    label_counts: list[int]
    """Samples per class index in this shard."""


@dataclass
class SplitInfo:
    name: str
    num_samples: int
    shards: list[ShardInfo]


@dataclass
class Manifest:
    dataset: str
    """Human name of the source, e.g. 'synthetic' or 'cifar10'."""
    classes: list[str]
    image_size: Optional[tuple[int, int]]
    """(height, width) of the stored images; None when sizes vary (image folders kept at their size)."""
    channels: int
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    """Where the data came from and with which parameters (checksums, seeds)."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def flip_safe(self) -> bool:
        """Whether a horizontal flip keeps what the images mean (`source["flip_safe"]`, a bool: checked when
        the manifest is read; manifests without it are)."""
        return bool(self.source.get("flip_safe", True))

    def split(self, name: str, dataset_dir: str | os.PathLike = "", key: str = "") -> SplitInfo:
        """The split called `name`; a `DataError` naming the available splits otherwise."""
        if name not in self.splits:
            where = f"{key}={name!r}: " if key else ""
            raise DataError(
                f"{where}dataset {dataset_dir or self.dataset} has no split '{name}'. "
                f"Available splits: {', '.join(self.splits)}."
            )
        return self.splits[name]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False) + "\n"

    def fingerprint(self) -> str:
        """Hash of the manifest's content: changes whenever any shard's bytes change."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def sample_location(shard: str | os.PathLike, key: str | None = None, index: int | None = None) -> str:
    """How a message names a sample: 'SHARD sample KEY' (its key within the shard), or where the key is not
    at hand (a cached shard not yet indexed) 'SHARD sample index I' (its index in the split)."""
    return f"{shard} sample {key}" if key is not None else f"{shard} sample index {index}"


def readable_bytes(count: int) -> str:
    """A byte count for messages: 92.2 kB, 161.1 GB, 3,000.0 TB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count} bytes"


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def write_manifest(dataset_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(dataset_dir) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(dataset_dir: str | os.PathLike) -> Manifest:
    """Parse and check `DIR/manifest.json`; every problem is a `DataError` naming the file."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {dataset_dir} is not a distvit dataset, or `distvit prepare` did not "
            f"finish there (the manifest is written last). Run `distvit prepare ... --out {dataset_dir}`."
        )
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(payload: bytes, path: str | os.PathLike) -> Manifest:
    """Parse and check manifest bytes (`path` names them in errors)."""
    try:
        raw = json.loads(payload)
        if raw.get("format") != FORMAT_NAME:
            raise DataError(
                f"{path} is not a distvit manifest (format={raw.get('format')!r}, expected {FORMAT_NAME!r})."
            )
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{path} has format_version {raw.get('format_version')}, this distvit reads {FORMAT_VERSION}. "
                f"Prepare the dataset again with this version of distvit."
            )
        splits = {
            name: SplitInfo(
                name=body["name"],
                num_samples=int(body["num_samples"]),
                shards=[ShardInfo(**shard) for shard in body["shards"]],
            )
            for name, body in raw["splits"].items()
        }
        manifest = Manifest(
            dataset=raw["dataset"],
            classes=list(raw["classes"]),
            image_size=tuple(raw["image_size"]) if raw["image_size"] else None,
            channels=int(raw["channels"]),
            splits=splits,
            source=raw.get("source", {}),
        )
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path} is damaged or from an incompatible tool ({type(err).__name__}: {err}). Prepare the dataset again."
        ) from None
    _check_structure(manifest, path)
    for split in manifest.splits.values():
        for shard in split.shards:
            # Names become paths and, with data.remote, parts of shell commands: plain file names only.
            if not SAFE_SHARD_NAME.fullmatch(shard.name) or ".." in shard.name:
                raise DataError(
                    f"{path}: shard name {shard.name!r} is not a plain NAME.tar file name; refusing the manifest."
                )
        counted = sum(shard.num_samples for shard in split.shards)
        if counted != split.num_samples:
            raise DataError(
                f"{path}: split '{split.name}' says {split.num_samples} samples but its shards hold {counted}. "
                f"Prepare the dataset again."
            )
    return manifest


MAX_IMAGE_SIDE = 16384
"""Largest stored image side a manifest may declare (the memory reader allocates from it)."""


def _check_structure(manifest: Manifest, path: str | os.PathLike) -> None:
    """What `prepare` never writes: repeated or blank class names, a shard listed twice (within a split
    or by two splits), an image size or channel count no image has, an integer that is not one."""
    classes = manifest.classes
    if not classes or not all(isinstance(name, str) and name.strip() for name in classes):
        raise DataError(f"{path}: class names must be non-empty text; prepare the dataset again.")
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: class name(s) {repeated} appear more than once; every class needs its own name.")
    if manifest.channels not in (1, 3):
        raise DataError(f"{path}: channels={manifest.channels}; distvit datasets have 1 or 3 channels.")
    size = manifest.image_size
    if size is not None and (
        len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in size)
    ):
        raise DataError(
            f"{path}: image_size {list(size)} is not two whole numbers from 1 to {MAX_IMAGE_SIDE}; prepare the "
            "dataset again."
        )
    _check_source(manifest.source, path)
    seen: dict[str, str] = {}
    for split in manifest.splits.values():
        for shard in split.shards:
            if not isinstance(shard.num_samples, int) or isinstance(shard.num_samples, bool) or shard.num_samples < 0:
                raise DataError(f"{path}: shard {shard.name!r} has num_samples={shard.num_samples!r}.")
            if shard.name in seen:
                where = "twice in split" if seen[shard.name] == split.name else f"in splits '{seen[shard.name]}' and"
                raise DataError(
                    f"{path}: shard {shard.name!r} is listed {where} '{split.name}': every sample belongs to one "
                    "split once. Prepare the dataset again."
                )
            seen[shard.name] = split.name


IMAGE_FORMATS = ("png", "jpeg")


def _check_source(source: Any, path: str | os.PathLike) -> None:
    """The `source` fields readers act on, by type: JSON's "false" (a string) is truthy, so a hand-edited
    `"flip_safe": "false"` would otherwise count as flip-safe."""
    if not isinstance(source, dict):
        raise DataError(
            f"{path}: source must be a mapping of fields, got {type(source).__name__}; prepare the dataset again."
        )
    flip_safe = source.get("flip_safe", True)
    if not isinstance(flip_safe, bool):
        raise DataError(
            f"{path}: source.flip_safe is {flip_safe!r} ({type(flip_safe).__name__}), not true or false: write "
            "true or false without quotes (false: a horizontal flip changes what the images mean), or prepare the "
            "dataset again."
        )
    image_format = source.get("image_format", "png")
    if image_format not in IMAGE_FORMATS:
        raise DataError(
            f"{path}: source.image_format is {image_format!r}, not one of {', '.join(IMAGE_FORMATS)} (how the "
            "shards store images; readers choose their decoder by it). Prepare the dataset again."
        )
