"""A folder of images in `class_name/image.ext` layout into distvit shards.

    distvit prepare imagefolder --source DIR --out DIR [--val-fraction F] [--image-size S] [--strict]

Layout: `DIR/<class>/<image>` (any depth below the class folder), split into train / val with a seeded,
per-class split; or `DIR/train/<class>/...` and `DIR/val/<class>/...` (and `DIR/test/...`) used as
given. Every image becomes 8-bit RGB: EXIF orientation applied, grayscale / palette / CMYK / 16-bit
converted, transparency composited on white, first frame of animations. With `--image-size S` it is
resized (shorter side to S, bicubic) and centre-cropped to S x S; otherwise kept at its size. A file that
cannot be decoded (empty, truncated, not an image) is reported and skipped, or is an error with
`--strict`. Decoding runs in a process pool; the output does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distvit.data.images import DECODE_ERRORS, open_image, resize_and_crop, to_rgb
from distvit.data.manifest import Manifest
from distvit.data.prepare.writer import PNG, EncodedImage, StoredFormat, write_dataset
from distvit.errors import DataError

SPLIT_FOLDERS = ("train", "val", "test")


@dataclass(frozen=True)
class SourceFile:
    path: Path
    label: int


@dataclass
class Scan:
    classes: list[str]
    splits: dict[str, list[SourceFile]]
    from_split_folders: bool = False
    """True when the source had train/ (val/, test/) folders; False for a seeded split."""
    ignored: list[Path] = field(default_factory=list)
    """Hidden files (names starting with '.'), not counted as images."""
    outside: list[Path] = field(default_factory=list)
    """Symbolic links (files or class folders) that lead out of the source folder: not imported."""


LEAVES_SOURCE = "a symbolic link leading out of the source folder (not imported)"


def printable(path: Path | str) -> str:
    """A file name for one line of a report: control characters (a newline could forge a line) and
    undecodable bytes escaped."""
    text = str(path).encode("utf-8", "backslashreplace").decode()
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def _leaves(path: Path, source: Path) -> bool:
    return path.is_symlink() and not path.resolve().is_relative_to(source.resolve())


def _files_below(folder: Path, source: Path) -> tuple[list[Path], list[Path], list[Path]]:
    files, hidden, outside = [], [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            hidden.append(path)
        elif _leaves(path, source):
            outside.append(path)
        else:
            files.append(path)
    return files, hidden, outside


def _class_folders(root: Path, source: Path, outside: list[Path] | None = None) -> list[Path]:
    folders = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _leaves(path, source):
            if outside is not None:
                outside.append(path)
            continue
        if not path.name.isprintable():
            raise DataError(
                f"class folder {printable(path)} has a control character in its name: rename it (class names "
                "are printed and logged one per line)."
            )
        folders.append(path)
    return folders


def scan(source: Path, val_fraction: float, seed: int) -> Scan:
    """Find classes and files; split train/val when the source has no split folders."""
    if not source.is_dir():
        raise DataError(f"--source {source} is not a folder (expected class_name/image.ext folders).")
    split_roots = {name: source / name for name in SPLIT_FOLDERS if (source / name).is_dir()}
    outside: list[Path] = []
    if "train" in split_roots:
        classes = [p.name for p in _class_folders(split_roots["train"], source, outside)]
        roots = split_roots
    else:
        classes = [p.name for p in _class_folders(source, source, outside)]
        roots = {"all": source}
    if not classes:
        raise DataError(
            f"{source} has no class folders: expected {source}/<class_name>/<image> "
            "(or train/ and val/ with class folders)."
        )
    if len(classes) == 1:
        raise DataError(f"{source} has a single class ({classes[0]}): classification needs at least two class folders.")
    ignored: list[Path] = []
    by_split: dict[str, list[SourceFile]] = {}
    for split, root in roots.items():
        present = [p.name for p in _class_folders(root, source, outside if split not in ("train", "all") else None)]
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DataError(
                f"{root} has classes that train/ lacks: {', '.join(unknown)}. Every class must be in train/."
            )
        files = []
        for label, name in enumerate(classes):
            if not (root / name).is_dir():
                continue
            if _leaves(root / name, source):
                continue
            found, hidden, leaving = _files_below(root / name, source)
            ignored += hidden
            outside += leaving
            if not found and split in ("all", "train"):
                raise DataError(f"class folder {root / name} holds no files: remove it or add images.")
            files += [SourceFile(path, label) for path in found]
        by_split[split] = files
    if not any(by_split.values()):
        raise DataError(f"{source} holds no image files.")
    if "all" in by_split:
        splits = _split_per_class(by_split["all"], len(classes), val_fraction, seed)
        return Scan(classes, splits, False, ignored, outside)
    return Scan(classes, by_split, True, ignored, outside)


def _split_per_class(
    files: list[SourceFile], num_classes: int, val_fraction: float, seed: int
) -> dict[str, list[SourceFile]]:
    """Seeded split that keeps each class's proportion (at least one train image per class)."""
    train, val = [], []
    for label in range(num_classes):
        members = [f for f in files if f.label == label]
        order = np.random.default_rng([seed, label]).permutation(len(members))
        n_val = min(len(members) - 1, int(round(len(members) * val_fraction)))
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return {"train": train, "val": val} if val else {"train": train}


@dataclass(frozen=True)
class Decoded:
    path: Path
    encoded: bytes | None
    size: tuple[int, int] | None
    sha256: str
    error: str = ""
    ext: str = "png"


def decode_file(path: Path, image_size: int | None, stored: StoredFormat = PNG) -> Decoded:
    """Read, decode, convert and (optionally) resize one file, and encode it as stored; never raises for
    bad content. A JPEG that is already what would be stored (JPEG asked for, the target size, upright,
    RGB or grey) keeps its original bytes: no second lossy encoding."""
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if not payload:
        return Decoded(path, None, None, digest, "empty file")
    try:
        with open_image(io.BytesIO(payload)) as image:
            image.seek(0)
            keep = stored.name == "jpeg" and _storable_as_is(image, image_size)
            array = to_rgb(image)
    except DECODE_ERRORS as err:
        return Decoded(path, None, None, digest, f"not a decodable image ({type(err).__name__}: {err})")
    if keep:
        return Decoded(path, payload, array.shape[:2], digest, ext="jpg")
    if image_size:
        array = resize_and_crop(array, image_size)
    return Decoded(path, stored.encode(np.ascontiguousarray(array)), array.shape[:2], digest, ext=stored.ext)


def _storable_as_is(image, image_size: int | None) -> bool:
    """A JPEG the readers decode to exactly what the import would store, before its re-encoding."""
    orientation = image.getexif().get(0x0112, 1)  # EXIF orientation: 1 is upright
    right_size = image_size is None or image.size == (image_size, image_size)
    return image.format == "JPEG" and image.mode in ("RGB", "L") and orientation == 1 and right_size


def _decoded_in_order(
    files: list[SourceFile], image_size: int | None, stored: StoredFormat, pool: ProcessPoolExecutor | None
) -> Iterator[tuple[SourceFile, Decoded]]:
    """Decode `files` in order, a block at a time, so memory holds one block of encoded images."""
    for start in range(0, len(files), DECODE_BLOCK):
        block = files[start : start + DECODE_BLOCK]
        paths = [f.path for f in block]
        if pool is None:
            results = [decode_file(p, image_size, stored) for p in paths]
        else:
            results = pool.map(decode_file, paths, [image_size] * len(paths), [stored] * len(paths), chunksize=16)
        yield from zip(block, results)


DECODE_BLOCK = 1024


@dataclass
class ImportReport:
    manifest: Manifest
    skipped: list[tuple[Path, str]]
    ignored: list[Path]


def prepare_imagefolder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    image_size: int | None = None,
    strict: bool = False,
    seed: int = 0,
    samples_per_shard: int = 5000,
    workers: int | None = None,
    stored_format: StoredFormat = PNG,
    flip_safe: bool = True,
) -> ImportReport:
    """Decode and write each split in a seeded random order, streaming: shards are written as images are
    decoded. The checks that need a whole split (--strict, classes without images) run at its end, before
    the manifest, so a refused import leaves no readable dataset."""
    source = Path(source)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    found = scan(source, val_fraction, seed)
    if strict and found.outside:
        listing = "\n  ".join(printable(path) for path in found.outside[:20])
        raise DataError(
            f"{len(found.outside)} symbolic link(s) in {printable(source)} lead out of it (--strict): copy what they "
            f"point to into the source folder, or leave --strict off to skip them:\n  {listing}"
        )
    workers = workers if workers is not None else (os.cpu_count() or 1)
    skipped: list[tuple[Path, str]] = [(path, LEAVES_SOURCE) for path in found.outside]
    hashes: list[bytes] = []

    def samples(split_index: int, split: str, files: list[SourceFile], pool) -> Iterator:
        order = np.random.default_rng([seed, split_index]).permutation(len(files))
        present = set()
        for file, decoded in _decoded_in_order([files[i] for i in order], image_size, stored_format, pool):
            hashes.append(os.fsencode(file.path.relative_to(source)) + f":{split}:{decoded.sha256}\n".encode())
            if decoded.error:
                skipped.append((decoded.path, decoded.error))
                continue
            present.add(file.label)
            yield EncodedImage(decoded.encoded, decoded.ext, decoded.size), file.label
        if strict and skipped:
            listing = "\n  ".join(f"{printable(path)}: {reason}" for path, reason in skipped[:20])
            raise DataError(f"{len(skipped)} file(s) in {source} are not usable images (--strict):\n  {listing}")
        missing = [name for label, name in enumerate(found.classes) if label not in present]
        if split == "train" and missing:
            raise DataError(f"class(es) {', '.join(missing)} have no decodable image in the train split of {source}.")

    def source_record() -> dict:
        content = hashlib.sha256(b"".join(sorted(hashes))).hexdigest()
        return {
            "name": "imagefolder",
            "folder": str(source.resolve()),
            "content_sha256": content,
            "val_fraction": val_fraction,
            "image_size": image_size,
            "seed": seed,
            "skipped_files": len(skipped),
            "split_folders": found.from_split_folders,
        }

    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        manifest = write_dataset(
            out_dir,
            dataset="imagefolder",
            classes=found.classes,
            image_size="infer",
            channels=3,
            splits={split: samples(i, split, files, pool) for i, (split, files) in enumerate(found.splits.items())},
            source=source_record,
            samples_per_shard=samples_per_shard,
            stored_format=stored_format,
            flip_safe=flip_safe,
        )
    finally:
        if pool is not None:
            pool.shutdown()
    return ImportReport(manifest, skipped, found.ignored)
