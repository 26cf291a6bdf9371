"""Shards kept elsewhere (object store, web server), fetched into `data.path` before training.

`data.remote` is a template with `{name}` (or a prefix to which the file name is appended):

    https://host/datasets/cifar10/{name}
    pipe:aws s3 cp s3://bucket/cifar10/{name} -
    pipe:gsutil cat gs://bucket/cifar10/{name}

Before training, the manifest and every shard of the splits in use that is not already present and
intact in `data.path` is fetched (distvit.data.read.fetch: time limits, bounded tries) into `<name>.part`,
checked against the manifest's size and sha256, and renamed. One process per node fetches (an exclusive
file lock on `data.path/.fetch.lock`); the others wait and then find the files in place. From then on
the local guarantees hold unchanged (exact epoch order, exactly once, resume): the price is local disk
space.

A fetch never replaces or deletes a file it did not write: `data.path/.distvit-fetched.json` records the
files it wrote (size, mtime, sha256) and the temporary files it is writing (recorded before they are
created). A file under a shard's name that matches the manifest is used as it is; one that does not is
replaced only if the record says a fetch wrote it (and it has not changed since), and otherwise refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from distvit.data.manifest import MANIFEST_NAME, parse_manifest, read_manifest
from distvit.data.read.fetch import FetchPolicy, fetch_file, remote_url
from distvit.data.read.shard_checks import _write_verified, find_bad_shards, read_verified
from distvit.errors import DataError
from distvit.fileio import atomic_write_bytes

__all__ = ["FetchPolicy", "fetch_dataset", "fetch_file", "fetch_manifest", "remote_url"]

RECORD_NAME = ".distvit-fetched.json"
PART_SUFFIX = ".part"


class FetchRecord:
    """`data.path/.distvit-fetched.json`: {"files": {name: [size, mtime_ns, sha256]}, "partial": [names]}."""

    def __init__(self, folder: Path):
        self.path = folder / RECORD_NAME
        self.folder = folder
        try:
            raw = json.loads(self.path.read_text())
            self.files = {str(k): list(v) for k, v in raw["files"].items()}
            self.partial = {str(name) for name in raw["partial"]}
        except FileNotFoundError:
            self.files, self.partial = {}, set()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise DataError(
                f"{self.path} (distvit's record of the files it fetched there) is damaged: delete it; a fetch then "
                "refuses to replace any file that does not match the manifest until you move it away."
            ) from None

    def wrote(self, name: str) -> bool:
        """A fetch wrote `folder/name` and it has not changed since (same size and mtime)."""
        entry = self.files.get(name)
        try:
            stat = (self.folder / name).stat()
        except OSError:
            return False
        return entry is not None and entry[:2] == [stat.st_size, stat.st_mtime_ns]

    def claim(self, tmp: str) -> None:
        """Record a temporary name before it is created; a file already there that is not one of ours stops."""
        if (self.folder / tmp).exists() and tmp not in self.partial:
            raise DataError(
                f"data.path={str(self.folder)!r} holds {tmp}, which distvit did not write; a fetch writes its "
                "temporary file under that name. Move it away."
            )
        self.partial.add(tmp)
        self._save()

    def finished(self, name: str, tmp: str, sha256: str | None) -> None:
        stat = (self.folder / name).stat()
        self.files[name] = [stat.st_size, stat.st_mtime_ns, sha256]
        self.partial.discard(tmp)
        self._save()

    def clear_partial(self) -> None:
        """Remove the temporary files of fetches that a kill interrupted (recorded, so ours)."""
        for tmp in sorted(self.partial):
            (self.folder / tmp).unlink(missing_ok=True)
        if self.partial:
            self.partial = set()
            self._save()

    def _save(self) -> None:
        atomic_write_bytes(self.path, json.dumps({"files": self.files, "partial": sorted(self.partial)}).encode())


def _dataset_folder(dataset_dir: str | os.PathLike) -> Path:
    folder = Path(dataset_dir)
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"data.path={str(folder)!r} is a file; with data.remote it is the folder shards are fetched into."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.path={str(folder)!r} cannot be created ({err.strerror}).") from None
    return folder


@contextlib.contextmanager
def _node_lock(folder: Path) -> Iterator[None]:
    """One fetching process per node (an exclusive lock on `data.path/.fetch.lock`); the others wait, then
    find everything in place. Every rank fetches through it: two writing the same record would collide."""
    with open(folder / ".fetch.lock", "a") as lock:  # "a": a file of that name is never emptied
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            raise DataError(f"cannot lock {folder}/.fetch.lock ({err.strerror}); use a node-local data.path.") from None
        yield


def fetch_manifest(template: str, folder: Path, policy: FetchPolicy = FetchPolicy()) -> bool:
    """Bring the manifest into `folder` unless it is there (checked before the rename); whether it was fetched."""
    folder = _dataset_folder(folder)
    if (folder / MANIFEST_NAME).is_file():
        return False
    with _node_lock(folder):
        return _fetch_manifest(template, folder, policy)


def _fetch_manifest(template: str, folder: Path, policy: FetchPolicy) -> bool:
    """fetch_manifest, under the node's lock."""
    if (folder / MANIFEST_NAME).is_file():  # another rank of the node fetched it while this one waited
        return False
    record = FetchRecord(folder)
    tmp = MANIFEST_NAME + PART_SUFFIX
    record.claim(tmp)
    url = remote_url(template, MANIFEST_NAME)
    check = lambda path: parse_manifest(path.read_bytes(), url)  # noqa: E731
    fetch_file(url, folder / MANIFEST_NAME, check=check, policy=policy, tmp=folder / tmp, what=MANIFEST_NAME)
    record.finished(MANIFEST_NAME, tmp, None)
    return True


def fetch_dataset(
    template: str, dataset_dir: str | os.PathLike, splits: list[str], verify: str, policy: FetchPolicy = FetchPolicy()
) -> list[str]:
    """Bring the manifest and the shards of `splits` into `dataset_dir`; returns the fetched file names.
    `verify`: how a local file is judged intact, 'sha256' or 'size' (what a fetched one always passes)."""
    folder = _dataset_folder(dataset_dir)
    fetched = []
    with _node_lock(folder):
        FetchRecord(folder).clear_partial()
        if _fetch_manifest(template, folder, policy):
            fetched.append(MANIFEST_NAME)
        manifest = read_manifest(folder)
        shards = {
            shard.name: shard for split in dict.fromkeys(splits) for shard in manifest.split(split, folder).shards
        }
        bad = find_bad_shards(folder, manifest, list(dict.fromkeys(splits)), verify)
        record = FetchRecord(folder)
        foreign = {
            name: problem
            for name, problem in bad.items()
            if os.path.lexists(folder / name) and not ((folder / name).is_file() and record.wrote(name))
        }
        if foreign:
            listed = "; ".join(f"{name}: {problem}" for name, problem in sorted(foreign.items())[:3])
            raise DataError(
                f"data.path={str(dataset_dir)!r} holds {len(foreign)} file(s) under the name of a shard of the "
                f"manifest that do not match it and that distvit did not fetch ({listed}). A fetch never replaces a "
                "file it did not write: move them away (or point data.path at another folder), then run again."
            )
        missing = [shard for name, shard in shards.items() if name in bad]  # in the manifest's order
        needed, free = sum(shard.num_bytes for shard in missing), shutil.disk_usage(folder).free
        if needed > free:
            raise DataError(
                f"fetching {len(missing)} shard(s) into data.path={dataset_dir} needs {needed / 1e9:.1f} GB, "
                f"{free / 1e9:.1f} GB are free. Point data.path at a larger disk."
            )
        verified = read_verified(folder)
        for shard in missing:
            tmp = shard.name + PART_SUFFIX
            record.claim(tmp)
            fetch_file(
                remote_url(template, shard.name),
                folder / shard.name,
                shard.num_bytes,
                shard.sha256,
                policy=policy,
                tmp=folder / tmp,
                what=f"shard {shard.name}",
                disk_hint="Free space there, or point data.path at a larger disk.",
            )
            record.finished(shard.name, tmp, shard.sha256)
            verified[shard.name] = record.files[shard.name]  # checked as it arrived: the preflight need not hash it
            fetched.append(shard.name)
        if missing:
            _write_verified(folder, verified)
    return fetched
