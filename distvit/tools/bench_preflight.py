"""`distvit bench preflight`: the start-up shard check of a large dataset, serial against parallel, and a
requeue that finds every shard verified before. Shards of random bytes in a scratch folder (hashing does
not look inside); they were just written, so they are read from the page cache: this measures hashing,
not the disk or a shared file system (which may well be slower)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from distvit.data.manifest import Manifest, ShardInfo, SplitInfo, sha256_file
from distvit.data.node import usable_cores
from distvit.data.read.shard_checks import find_bad_shards, verified_record_path


def write_shards(folder: Path, count: int, shard_bytes: int) -> Manifest:
    """`count` shards of random bytes and a manifest listing them (one sample each)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    block = os.urandom(shard_bytes)
    for index in range(count):
        path = folder / f"train-{index:05d}.tar"
        path.write_bytes(index.to_bytes(8, "little") + block[8:])  # distinct bytes, cheap to make
        shards.append(ShardInfo(path.name, 1, shard_bytes, sha256_file(path), [1]))
    split = SplitInfo("train", count, shards)
    return Manifest("bench", ["a"], None, 3, {"train": split})


def bench_preflight(count: int, shard_bytes: int, workers: int) -> list[tuple[str, float]]:
    """(case, seconds) for: serial hashing, parallel hashing on `workers` threads, a requeue."""
    scratch = Path(tempfile.mkdtemp(prefix="distvit-bench-preflight-"))
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(scratch / "cache")  # its own verified record, removed afterwards
    try:
        folder = scratch / "data"
        manifest = write_shards(folder, count, shard_bytes)
        results = []
        for name, threads in (("serial (1 thread)", 1), (f"parallel ({workers} threads)", workers)):
            verified_record_path(folder).unlink(missing_ok=True)
            start = time.perf_counter()
            assert not find_bad_shards(folder, manifest, ["train"], "sha256", workers=threads)
            results.append((name, time.perf_counter() - start))
        start = time.perf_counter()
        assert not find_bad_shards(folder, manifest, ["train"], "sha256", workers=workers)
        results.append(("requeue (all verified before)", time.perf_counter() - start))
        return results
    finally:
        if previous is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = previous
        shutil.rmtree(scratch, ignore_errors=True)


def format_preflight(results: list[tuple[str, float]], count: int, shard_bytes: int) -> str:
    total = count * shard_bytes
    serial = results[0][1]
    lines = [
        f"distvit bench preflight: {count} shards of {shard_bytes / 1e6:g} MB ({total / 1e9:.2f} GB), "
        f"{usable_cores()} usable cores, from the page cache",
        f"{'case':32s} {'seconds':>9s} {'GB/s':>8s} {'x serial':>9s}",
    ]
    for name, seconds in results:
        lines.append(f"{name:32s} {seconds:9.3f} {total / seconds / 1e9:8.2f} {serial / seconds:9.1f}")
    return "\n".join(lines)
