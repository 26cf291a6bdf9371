"""CIFAR-10 ("python version") into distvit shards.

    distvit prepare cifar10 --out DIR [--source PATH_OR_URL] [--skip-checksum]

The source is the official `cifar-10-python.tar.gz` (downloaded, a URL, or a local file) or an
extracted `cifar-10-batches-py/` folder. Its md5 is checked against the official value. Nothing is
extracted to disk: members are read from the archive in memory, after every member has been checked
to be a plain file or folder inside `cifar-10-batches-py/` (no absolute or `..` paths, no links, no
devices), and the pickles are read with an allow-list unpickler.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from distvit.data.manifest import Manifest
from distvit.data.prepare.safe_pickle import safe_loads
from distvit.data.prepare.writer import StoredFormat, write_dataset
from distvit.errors import DataError
from distvit.fileio import file_digest

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
# Official per-file md5s (the same values torchvision checks), for an already extracted folder.
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp", "file")


def download(url: str, target: Path) -> Path:
    """Fetch `url` to `target` via `<target>.part` (a broken download never looks complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as handle:
            shutil.copyfileobj(response, handle, length=1 << 20)
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError is an OSError
        partial.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} ({err}). Without network access, fetch {ARCHIVE_NAME} on a machine "
            f"that has it (e.g. a login node) and pass --source /path/to/{ARCHIVE_NAME}."
        ) from None
    os.replace(partial, target)
    return target


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse anything but plain files and folders inside FOLDER/."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0] != FOLDER):
        raise DataError(f"{archive}: member {member.name!r} lies outside {FOLDER}/; refusing a tampered archive.")
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise DataError(f"{archive}: member {member.name!r} is a {kind}; refusing a tampered archive.")


def _read_archive(archive: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            wanted = {f"{FOLDER}/{name}": name for name in FILE_MD5}
            files = {}
            for member in members:
                if member.name in wanted and member.isfile():
                    files[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{archive} is not a readable tar.gz archive ({err}).") from None
    missing = sorted(set(FILE_MD5) - set(files))
    if missing:
        raise DataError(
            f"{archive} lacks {', '.join(f'{FOLDER}/{m}' for m in missing)}: not a CIFAR-10 python archive."
        )
    return files


def _read_folder(folder: Path, verify: bool) -> dict[str, bytes]:
    files = {}
    for name, md5 in FILE_MD5.items():
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise DataError(f"{folder} lacks the regular file {name}: not an extracted {FOLDER}/ folder.")
        if verify and _md5(path) != md5:
            raise DataError(
                f"{path} does not have the official md5 ({md5}): it is damaged or not the original. "
                f"Download the dataset again, or pass --skip-checksum to use it anyway."
            )
        files[name] = path.read_bytes()
    return files


def _resolve_source(source: str | None, out_dir: Path, verify: bool) -> tuple[dict[str, bytes], dict]:
    """The seven CIFAR-10 files as bytes, and a description of where they came from."""
    if source is None or _is_url(source):
        url = source or URL
        cached = out_dir / ".download" / ARCHIVE_NAME
        if not (url == URL and cached.is_file() and _md5(cached) == ARCHIVE_MD5):  # re-runs reuse a good download
            download(url, cached)
        archive, origin = cached, {"url": url}
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            folder = path / FOLDER if (path / FOLDER).is_dir() else path
            return _read_folder(folder, verify), {
                "folder": str(folder.resolve()),
                "checksum": "per-file md5" if verify else "skipped",
            }
        if not path.is_file():
            raise DataError(f"--source {source} does not exist (expected {ARCHIVE_NAME}, a URL or a {FOLDER}/ folder).")
        archive, origin = path, {"archive": str(path.resolve())}
    digest = _md5(archive)
    if verify and digest != ARCHIVE_MD5:
        raise DataError(
            f"{archive} has md5 {digest}, the official {ARCHIVE_NAME} has {ARCHIVE_MD5}: the download is damaged "
            f"or the file is not the original. Download it again, or pass --skip-checksum to use it anyway."
        )
    return _read_archive(archive), {**origin, "md5": digest, "checksum": "verified" if verify else "skipped"}


def _parse_batch(payload: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_loads(payload, name)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{name}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels').")
    data = batch[b"data"]
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{name}: b'labels' must be a list of integers.") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: b'data' must be a uint8 array of N x 3072, got {getattr(data, 'shape', type(data))}.")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{name}: labels must be {data.shape[0]} integers in [0, 9].")
    images = data.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1)  # N x 32 x 32 x 3
    return images, labels


def load_cifar10(files: dict[str, bytes]) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and {'train': (images, labels), 'test': ...} in the official order."""
    meta = safe_loads(files[META_FILE], META_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get(b"label_names"), list):
        raise DataError(f"{META_FILE}: expected a dict with b'label_names'.")
    classes = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    if len(classes) != 10:
        raise DataError(f"{META_FILE}: CIFAR-10 has 10 label names, this file lists {len(classes)}.")
    splits = {}
    for split, names in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        parts = [_parse_batch(files[name], name) for name in names]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return classes, splits


def write_order(num_samples: int, seed: int, split_index: int) -> np.ndarray:
    """The seeded order in which a split's samples are written: entry i is the official index of the
    sample stored at position i."""
    return np.random.default_rng([seed, split_index]).permutation(num_samples)


def _in_order(images: np.ndarray, labels: np.ndarray, order: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    for index in order:
        yield images[index], int(labels[index])


def prepare_cifar10(
    out_dir: str | os.PathLike,
    *,
    source: str | None = None,
    skip_checksum: bool = False,
    seed: int = 0,
    samples_per_shard: int = 5000,
    stored_format: StoredFormat | None = None,
    flip_safe: bool = True,
) -> Manifest:
    """Write CIFAR-10's train (50,000) and test (10,000) splits as shards, in a seeded random order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, origin = _resolve_source(source, out, verify=not skip_checksum)
    classes, splits = load_cifar10(files)
    return write_dataset(
        out,
        dataset="cifar10",
        classes=classes,
        image_size=(32, 32),
        channels=3,
        splits={
            name: _in_order(images, labels, write_order(len(labels), seed, split_index))
            for split_index, (name, (images, labels)) in enumerate(splits.items())
        },
        source={"name": "cifar10", **origin, "seed": seed},
        samples_per_shard=samples_per_shard,
        stored_format=stored_format,
        flip_safe=flip_safe,
    )
