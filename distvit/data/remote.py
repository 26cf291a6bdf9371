"""Shards kept elsewhere (object store, web server): fetched with webdataset's `gopen` into `data.path`.

`data.remote` is a template with `{name}` (or a prefix to which the file name is appended):

    https://host/datasets/cifar10/{name}
    pipe:aws s3 cp s3://bucket/cifar10/{name} -
    pipe:gsutil cat gs://bucket/cifar10/{name}

Before training, the manifest and every shard of the splits in use that is not already present and
intact in `data.path` is streamed through `gopen` into `<name>.<pid>.tmp`, checked against the
manifest's size and sha256, and renamed. One process per node fetches (an exclusive file lock on
`data.path/.fetch.lock`); the others wait and then find the files in place. From then on the local
guarantees hold unchanged (exact epoch order, exactly once, resume): the price is local disk space.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from distvit.data.manifest import MANIFEST_NAME, parse_manifest, read_manifest
from distvit.data.preflight import shard_problem
from distvit.errors import DataError


def remote_url(template: str, name: str) -> str:
    return template.replace("{name}", name) if "{name}" in template else template + name


def fetch_file(
    url: str, target: Path, expected_size: int | None = None, expected_sha256: str | None = None, check=None
) -> None:
    """Stream `url` into `target` via a temp file; `check(tmp_path)` may refuse the content before the rename."""
    import webdataset as wds

    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with wds.gopen(url, "rb") as source, open(tmp, "wb") as sink:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                sink.write(block)
            sink.flush()
            os.fsync(sink.fileno())
        size = tmp.stat().st_size
        if expected_size is not None and size != expected_size:
            raise DataError(f"{url} delivered {size} bytes, the manifest says {expected_size}.")
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise DataError(f"{url} does not match the sha256 in the manifest (corrupted or changed at the source).")
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
    except (OSError, ValueError) as err:  # gopen raises ValueError for schemes it has no handler for
        raise DataError(
            f"could not fetch {url} ({err}). data.remote must be an http(s)://, file:// or pipe: template "
            f"(e.g. 'pipe:aws s3 cp s3://bucket/ds/{{name}} -'); check it and the credentials of its tool."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_manifest(template: str, folder: Path) -> bool:
    """Bring the manifest into `folder` unless it is there (checked before the rename); whether it was fetched."""
    if (folder / MANIFEST_NAME).is_file():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    url = remote_url(template, MANIFEST_NAME)
    fetch_file(url, folder / MANIFEST_NAME, check=lambda tmp: parse_manifest(tmp.read_bytes(), url))
    return True


def fetch_dataset(template: str, dataset_dir: str | os.PathLike, splits: list[str], verify: str) -> list[str]:
    """Bring the manifest and the shards of `splits` into `dataset_dir`; returns the fetched file names.
    `verify`: how a local file is judged intact, 'sha256' or 'size' (what a fetched one always passes)."""
    folder = Path(dataset_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fetched = []
    with open(folder / ".fetch.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetcher per node; the others wait, then find everything in place
        except OSError as err:
            raise DataError(f"cannot lock {folder}/.fetch.lock ({err.strerror}); use a node-local data.path.") from None
        if fetch_manifest(template, folder):
            fetched.append(MANIFEST_NAME)
        manifest = read_manifest(folder)
        missing = [
            shard
            for split in dict.fromkeys(splits)
            for shard in manifest.split(split, folder).shards
            if shard_problem(folder, shard.name, shard.num_bytes, shard.sha256, verify)
        ]
        needed, free = sum(shard.num_bytes for shard in missing), shutil.disk_usage(folder).free
        if needed > free:
            raise DataError(
                f"fetching {len(missing)} shard(s) into data.path={dataset_dir} needs {needed / 1e9:.1f} GB, "
                f"{free / 1e9:.1f} GB are free. Point data.path at a larger disk."
            )
        for shard in missing:
            fetch_file(remote_url(template, shard.name), folder / shard.name, shard.num_bytes, shard.sha256)
            fetched.append(shard.name)
    return fetched
