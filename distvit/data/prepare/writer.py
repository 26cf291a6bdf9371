"""Writes a dataset as webdataset tar shards plus a manifest, atomically and reproducibly.

Every importer (synthetic, CIFAR-10, image folders) hands its samples to `write_dataset`, so all
datasets share one on-disk format:

    DIR/train-00000.tar ...   samples `<key>.png` (or `.jpg`) image and `<key>.cls` (class index)
    DIR/test-00000.tar ...
    DIR/manifest.json         written last; its presence marks the dataset complete

Each shard is written to `<name>.tmp` and renamed when complete; tar headers carry a fixed mtime and
owner, so the same input gives the same bytes (and the same sha256).

Writing into a folder that holds a dataset replaces it atomically: the new shards are written in
DIR/.distvit-prepare/ under names the old manifest does not use (`train-b-00000.tar` beside
`train-00000.tar`), moved in, and the new manifest is the commit; only then are the files the old
manifest listed deleted, and nothing else in DIR ever is. A record of the swap (DIR/.distvit-prepare.json)
lets the next prepare finish or undo a swap that a kill interrupted, and say so.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from distvit.data.manifest import (
    MANIFEST_NAME,
    SAFE_SHARD_NAME,
    Manifest,
    ShardInfo,
    SplitInfo,
    parse_manifest,
    sha256_file,
    write_manifest,
)
from distvit.data.shard_format import LABEL_MEMBER, label_payload
from distvit.errors import DataError
from distvit.fileio import atomic_write_bytes, write_failure

if TYPE_CHECKING:
    import webdataset as wds  # annotations only: webdataset stays an optional, lazy import

DEFAULT_SAMPLES_PER_SHARD = 5000
STAGING_NAME = ".distvit-prepare"
SWAP_RECORD = ".distvit-prepare.json"
STAGING_MARK = ".distvit-staging"  # inside STAGING_NAME: a folder of that name without it is not ours


@dataclass(frozen=True)
class EncodedImage:
    """An image already encoded by the importer (e.g. JPEG kept as JPEG)."""

    data: bytes
    ext: str  # "png" or "jpg"
    size: tuple[int, int] | None = None  # (height, width), for the manifest


@dataclass(frozen=True)
class StoredFormat:
    """How `prepare` stores decoded images: PNG (lossless, the default: small for CIFAR-sized images) or
    JPEG at a quality (a quarter of PNG's bytes for photos, decoded ~2x faster, and on a GPU by nvJPEG)."""

    name: str = "png"
    quality: int = 95

    @property
    def ext(self) -> str:
        return "jpg" if self.name == "jpeg" else "png"

    def encode(self, image: np.ndarray) -> bytes:
        return encode_jpeg(image, self.quality) if self.name == "jpeg" else encode_png(image)

    def describe(self) -> dict[str, Any]:
        """The manifest's record of it (under `source`; nothing for PNG, as manifests before JPEG)."""
        return {"image_format": "jpeg", "jpeg_quality": self.quality} if self.name == "jpeg" else {}


PNG = StoredFormat()


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """uint8 HxWxC -> baseline JPEG (4:2:0 chroma as photos are usually stored); deterministic."""
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HxWxC (C = 1 or 3) -> PNG bytes; deterministic for the same pixels."""
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    mode_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    mode_image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


class SplitWriter:
    """Writes one split's samples, in the order given, into shards of at most `samples_per_shard`."""

    def __init__(self, out_dir: Path, split: str, num_classes: int, samples_per_shard: int, generation: str = ""):
        if "." in split or "/" in split or not split:
            raise ValueError(f"split name {split!r} must be non-empty without '.' or '/'")
        self.out_dir = out_dir
        self.split = split
        self.num_classes = num_classes
        self.samples_per_shard = samples_per_shard
        self.generation = generation  # "" or "b-", "c-", ...: shard names the folder's old dataset does not use
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self.image_sizes: set = set()
        self._tar: "wds.TarWriter | None" = None
        self._tmp_path: Path | None = None
        self._shard_counts: list[int] = []

    def _open_shard(self) -> None:
        import webdataset as wds  # only where shards are written: in-memory data needs no webdataset

        name = f"{self.split}-{self.generation}{len(self.shards):05d}.tar"
        self._tmp_path = self.out_dir / (name + ".tmp")
        self._tar = wds.TarWriter(str(self._tmp_path), mtime=0, user="distvit", group="distvit")
        self._shard_counts = [0] * self.num_classes

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None
        self._tar.close()
        with open(self._tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        final = self._tmp_path.with_suffix("")  # strip ".tmp"
        os.replace(self._tmp_path, final)
        self.shards.append(
            ShardInfo(
                name=final.name,
                num_samples=sum(self._shard_counts),
                num_bytes=final.stat().st_size,
                sha256=sha256_file(final),
                label_counts=self._shard_counts,
            )
        )
        self._tar = None

    def add(self, payload: bytes, label: int, ext: str = "png", size: tuple[int, int] | None = None) -> None:
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        if self._tar is None:
            self._open_shard()
        # The key is the sample's position in the split, so readers can name samples exactly.
        self._tar.write(
            {"__key__": f"{self.split}_{self.num_samples:08d}", ext: payload, LABEL_MEMBER: label_payload(label)}
        )
        self._shard_counts[label] += 1
        self.num_samples += 1
        self.image_sizes.add(size)
        if sum(self._shard_counts) >= self.samples_per_shard:
            self._close_shard()

    def close(self) -> SplitInfo:
        if self._tar is not None:
            self._close_shard()
        return SplitInfo(name=self.split, num_samples=self.num_samples, shards=self.shards)


def _listed_files(out: Path) -> dict[str, int]:
    """The shard files the folder's manifest lists, with their sizes (none without a readable manifest)."""
    path = out / MANIFEST_NAME
    try:
        manifest = parse_manifest(path.read_bytes(), path)
    except (OSError, DataError):
        return {}
    return {shard.name: shard.num_bytes for split in manifest.splits.values() for shard in split.shards}


def _remove_ours(out: Path, files: dict[str, int]) -> tuple[int, list[str]]:
    """Delete the listed files that are still what distvit wrote or listed (a plain shard name, the size
    recorded); anything else of that name (a user's file put there since) stays. Returns (removed, kept)."""
    removed, kept = 0, []
    for name, size in files.items():
        path = out / name
        if not path.is_file() or path.is_symlink():
            continue
        if SAFE_SHARD_NAME.fullmatch(name) and path.stat().st_size == size:
            path.unlink()
            removed += 1
        else:
            kept.append(name)
    return removed, kept


def _owned_staging(staging: Path) -> bool:
    return staging.is_dir() and not staging.is_symlink() and (staging / STAGING_MARK).is_file()


def _recover_interrupted_prepare(out: Path) -> None:
    """Finish (or undo) a swap a kill interrupted, and remove a killed prepare's staging folder; say so."""
    record_path = out / SWAP_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            new, old = dict(record["new"]), dict(record["old"])
        except (ValueError, KeyError, TypeError, OSError):
            new, old = {}, {}
        listed = _listed_files(out)
        committed = bool(new) and set(new) <= set(listed)
        leftovers = {n: size for n, size in (old if committed else new).items() if n not in listed}
        removed, kept = _remove_ours(out, leftovers)
        record_path.unlink()
        what = "old dataset's shards" if committed else "unfinished new dataset's shards"
        note = f"; kept {', '.join(kept)} (changed since)" if kept else ""
        print(
            f"distvit: note: {out}: a prepare was killed while swapping datasets; removed {removed} "
            f"of the {what}{note}.",
            file=sys.stderr,
        )
    staging = out / STAGING_NAME
    if _owned_staging(staging):
        shutil.rmtree(staging)
        print(f"distvit: note: removed {staging}, left by a prepare that did not finish.", file=sys.stderr)
    elif staging.exists() or staging.is_symlink():
        raise DataError(f"{staging} exists and is not distvit's: move it away, then prepare again.")


def _generation(out: Path, splits: Iterable[str]) -> str:
    """A shard-name generation ("" for train-00000.tar, "b-" for train-b-00000.tar, ...) whose names no
    file in the folder has: the new shards can move in beside the old dataset's."""
    names = {p.name for p in out.iterdir()}
    alternation = "|".join(re.escape(split) for split in splits)
    for generation in ["", *(f"{letter}-" for letter in "bcdefghijklmnopqrstuvwxyz")]:
        pattern = re.compile(rf"({alternation})-{re.escape(generation)}\d{{5,}}\.tar(\.tmp)?")
        if not any(pattern.fullmatch(name) for name in names):
            return generation
    raise DataError(f"{out} holds shards of 25 generations; prepare into a new folder.")


def _swap_in(out: Path, staging: Path, manifest: Manifest) -> None:
    """Move the new shards in, commit with the new manifest, then delete what the old manifest listed.
    The record written first lets the next prepare finish or undo a swap a kill or a full disk stops."""
    new = {shard.name: shard.num_bytes for split in manifest.splits.values() for shard in split.shards}
    old = {name: size for name, size in _listed_files(out).items() if name not in new}
    try:
        atomic_write_bytes(out / SWAP_RECORD, json.dumps({"new": new, "old": old}).encode())
        for name in new:
            if (out / name).exists():  # appeared since the generation was chosen: never replaced
                raise DataError(f"{out / name} appeared while the dataset was written; move it away and prepare again.")
            os.replace(staging / name, out / name)
        write_manifest(out, manifest)
    except OSError as err:
        raise DataError(
            f"{write_failure(err.filename or out / MANIFEST_NAME, err)}. The folder's previous dataset is unchanged; "
            "the next prepare there removes what this one moved in."
        ) from None
    _remove_ours(out, old)
    (out / SWAP_RECORD).unlink()
    shutil.rmtree(staging)


@contextlib.contextmanager
def _staging(out: Path, splits: Iterable[str]) -> Iterator[tuple[Path, str]]:
    """The folder the new dataset is written in and its shard-name generation. On any error it is
    removed; a failed write (a full disk) becomes one DataError, the folder's dataset untouched."""
    generation = _generation(out, splits)
    staging = out / STAGING_NAME
    staging.mkdir()
    (staging / STAGING_MARK).write_text("written by distvit prepare; removed when it ends\n")
    try:
        yield staging, generation
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(
            f"{write_failure(err.filename or staging, err)}. The folder's previous dataset, if any, is unchanged."
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    classes: list[str],
    image_size: tuple[int, int] | None | str,
    channels: int,
    splits: Mapping[str, Iterable[tuple[np.ndarray | EncodedImage, int]]],
    source: dict[str, Any] | Callable[[], dict[str, Any]],
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    stored_format: StoredFormat | None = None,
    flip_safe: bool = True,
) -> Manifest:
    """Write every split's (uint8 HxWxC array or EncodedImage, label) samples as shards, then the manifest.

    `image_size="infer"` records the images' common size (None when sizes differ); `source` may be a
    function, called once every split is written (for checksums gathered while writing). Splits that
    end up empty are left out of the manifest. `flip_safe=False` (horizontal flips change what the images
    mean) is recorded as `"flip_safe": false` under `source`; flip-safe data records nothing, as before."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored_format = stored_format or PNG
    _recover_interrupted_prepare(out)
    with _staging(out, splits.keys()) as (staging, generation):
        written = {}
        sizes: set = set()
        for split, samples in splits.items():
            writer = SplitWriter(staging, split, len(classes), samples_per_shard, generation)
            for image, label in samples:
                if isinstance(image, EncodedImage):
                    writer.add(image.data, int(label), image.ext, image.size)
                else:
                    writer.add(stored_format.encode(image), int(label), stored_format.ext, image.shape[:2])
            info = writer.close()
            sizes |= writer.image_sizes
            if info.num_samples:
                written[split] = info
        if image_size == "infer":
            image_size = next(iter(sizes)) if len(sizes) == 1 and None not in sizes else None
        manifest = Manifest(
            dataset=dataset,
            classes=list(classes),
            image_size=tuple(image_size) if image_size else None,
            channels=channels,
            splits=written,
            source={
                **(source() if callable(source) else source),
                **stored_format.describe(),
                **({} if flip_safe else {"flip_safe": False}),
            },
        )
    _swap_in(out, staging, manifest)
    return manifest


def write_generated(
    out_dir: str | os.PathLike,
    dataset: str,
    classes: list[str],
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    source: dict[str, Any],
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    stored_format: StoredFormat | None = None,
    flip_safe: bool = True,
) -> Manifest:
    """`write_dataset` for generated splits: (uint8 N x S x S x 3 images, labels) arrays by split name."""
    size = next(iter(splits.values()))[0].shape[1]
    return write_dataset(
        out_dir,
        dataset=dataset,
        classes=classes,
        image_size=(size, size),
        channels=3,
        splits={name: ((image, int(label)) for image, label in zip(*arrays)) for name, arrays in splits.items()},
        source=source,
        samples_per_shard=samples_per_shard,
        stored_format=stored_format,
        flip_safe=flip_safe,
    )
