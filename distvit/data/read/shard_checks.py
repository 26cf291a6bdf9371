"""Preflight: check a dataset's shards against its manifest before any training step.

`data.verify=sha256` (default) hashes every shard of the splits in use; `size` only compares byte sizes
(for very large datasets). A missing, truncated or corrupted shard is an error naming the file, unless
`data.bad_shards=skip`: then the bad shards are left out, the same ones on every rank (the ranks unite
their findings before training), and the run says which.

Hashing runs on several cores (threads: hashlib releases the GIL on large blocks, so threads hash in
parallel without the start-up and pickling of processes), and a record of the shards that matched (size,
mtime and sha256 of each, in the user's cache folder, keyed by the dataset's path: the dataset folder is
never written to) lets the next run, a requeue say, skip every shard whose size and mtime are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distvit.data.manifest import Manifest, ShardInfo, SplitInfo, sha256_file
from distvit.data.node import session_id, usable_cores
from distvit.errors import DataError
from distvit.fileio import atomic_write_bytes


def preflight_marker() -> Path:
    """Created by a node's leader when its preflight ends: the node's other ranks wait for it."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"distvit-preflight-{session_id()}"


def verified_record_path(folder: Path) -> Path:
    """Where the record of `folder`'s verified shards is kept: {name: [size, mtime_ns, sha256]}."""
    import hashlib

    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distvit" / "verified"
    return home / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32] + ".json")


HASH_BYTES_PER_SECOND = 1.5e9
"""sha256 per core, a little under what one core of the machines here does (1.8 GB/s): for estimates."""


def shard_problem(dataset_dir: str | os.PathLike, name: str, num_bytes: int, sha256: str, verify: str) -> str:
    """'' when the shard is fine, else what is wrong with it."""
    path = Path(dataset_dir) / name
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != num_bytes:
        return f"{size} bytes, the manifest says {num_bytes} (truncated or changed)"
    if verify == "sha256" and sha256_file(path) != sha256:
        return "sha256 differs from the manifest (corrupted or changed)"
    return ""


def find_bad_shards(
    dataset_dir: str | os.PathLike, manifest: Manifest, splits: list[str], verify: str, workers: int | None = None
) -> dict[str, str]:
    """{shard name: problem} over the given splits. With verify='sha256' the shards not already in the
    verified record (same size and mtime) are hashed by `workers` threads (default: the usable cores),
    and the record is updated where the folder is writable."""
    folder = Path(dataset_dir)
    shards = _shards_of(manifest, splits)
    bad = {name: problem for name, shard in shards.items() if (problem := _size_problem(folder, shard))}
    if verify != "sha256":
        return bad
    record = read_verified(folder)
    to_hash = [shard for name, shard in shards.items() if name not in bad and not _recorded(folder, shard, record)]
    with ThreadPoolExecutor(max_workers=workers or usable_cores()) as pool:
        hashed = pool.map(lambda shard: sha256_file(folder / shard.name), to_hash)
        digests = dict(zip((shard.name for shard in to_hash), hashed))
    for shard in to_hash:
        if digests[shard.name] == shard.sha256:
            stat = (folder / shard.name).stat()
            record[shard.name] = [stat.st_size, stat.st_mtime_ns, shard.sha256]
        else:
            bad[shard.name] = "sha256 differs from the manifest (corrupted or changed)"
            record.pop(shard.name, None)
    if to_hash:
        _write_verified(folder, record)
    return dict(sorted(bad.items()))


def hashing_estimate(dataset_dir: str | os.PathLike, manifest: Manifest, splits: list[str]) -> tuple[int, float]:
    """Bytes a sha256 preflight would hash now (the verified record considered) and the seconds it would
    take on the usable cores, roughly."""
    folder, record = Path(dataset_dir), read_verified(Path(dataset_dir))
    shards = _shards_of(manifest, splits)
    pending = sum(shard.num_bytes for shard in shards.values() if not _recorded(folder, shard, record))
    return pending, pending / (HASH_BYTES_PER_SECOND * min(usable_cores(), 16))


def _shards_of(manifest: Manifest, splits: list[str]) -> dict[str, ShardInfo]:
    """The shards of the splits in use, by name (a split named twice counts once)."""
    return {shard.name: shard for split in dict.fromkeys(splits) for shard in manifest.splits[split].shards}


def read_verified(folder: Path) -> dict[str, list]:
    try:
        record = json.loads(verified_record_path(folder).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _recorded(folder: Path, shard: ShardInfo, record: dict[str, list]) -> bool:
    """The shard matched its manifest entry before and has not changed since (size, mtime)."""
    entry = record.get(shard.name)
    try:
        stat = (folder / shard.name).stat()
    except OSError:
        return False
    return entry == [stat.st_size, stat.st_mtime_ns, shard.sha256]


def _write_verified(folder: Path, record: dict[str, list]) -> None:
    path = verified_record_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record, sort_keys=True).encode())
    except OSError:
        pass  # no writable cache folder: the next run hashes again


def _size_problem(folder: Path, shard: ShardInfo) -> str:
    return shard_problem(folder, shard.name, shard.num_bytes, shard.sha256, verify="size")


def describe(dataset_dir: str | os.PathLike, bad: dict[str, str]) -> str:
    return "; ".join(f"{Path(dataset_dir) / name}: {problem}" for name, problem in sorted(bad.items()))


def bad_shards_message(dataset_dir: str | os.PathLike, bad: dict[str, str]) -> str:
    return (
        f"{len(bad)} bad shard(s): {describe(dataset_dir, bad)}. Prepare the dataset again, or set "
        f"data.bad_shards=skip to train without them."
    )


def without_shards(manifest: Manifest, names: set[str], dataset_dir: str | os.PathLike) -> Manifest:
    """The manifest with the named shards left out of every split (counts adjusted)."""
    splits = {}
    for split_name, split in manifest.splits.items():
        kept = [shard for shard in split.shards if shard.name not in names]
        if split.shards and not kept:
            raise DataError(f"every shard of split '{split_name}' in {dataset_dir} is bad; prepare the dataset again.")
        splits[split_name] = SplitInfo(split_name, sum(s.num_samples for s in kept), kept)
    return dataclasses.replace(manifest, splits=splits)
