"""Preflight: check a dataset's shards against its manifest before any training step.

`data.verify=sha256` (default) hashes every shard of the splits in use; `size` only compares byte sizes
(for very large datasets). A missing, truncated or corrupted shard is an error naming the file, unless
`data.bad_shards=skip`: then the bad shards are left out, the same ones on every rank (the ranks unite
their findings before training), and the run says which.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from distvit.data.manifest import Manifest, SplitInfo, sha256_file
from distvit.errors import DataError


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
    dataset_dir: str | os.PathLike, manifest: Manifest, splits: list[str], verify: str
) -> dict[str, str]:
    """{shard name: problem} over the given splits."""
    bad = {}
    for split in dict.fromkeys(splits):
        for shard in manifest.splits[split].shards:
            problem = shard_problem(dataset_dir, shard.name, shard.num_bytes, shard.sha256, verify)
            if problem:
                bad[shard.name] = problem
    return bad


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
