"""Atomic file writes: readers see the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open `<path>.tmp` for writing; on success fsync and rename it to `path`, on error remove it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(payload)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A command's output file (`--json F`, `--profile F`) must be a file in an existing folder: checked
    before the command's work, so a typo costs nothing."""
    from distvit.errors import DistvitError

    target = Path(path)
    if target.is_dir():
        raise DistvitError(f"{flag} {path}: is a folder; give the path of the file to write.")
    if not target.parent.is_dir():
        raise DistvitError(f"{flag} {path}: the folder {target.parent} does not exist; create it first.")
    return target


def write_failure(path: str | os.PathLike, err: BaseException) -> str:
    """'writing PATH failed (reason); N MB free there': the start of the one-line error for a write that
    failed, a full disk above all (torch reports one as a RuntimeError, 'unexpected pos')."""
    import shutil

    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MB free there"
    except OSError:
        free = "its folder cannot be read"
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return f"writing {path} failed ({reason}); {free}"


def hold_lock(path: str | os.PathLike):
    """Take an exclusive lock on `path` for as long as the returned handle stays open (released when the
    process ends, however it ends) and write this process and host into it. None when another process
    holds it: then `lock_holder(path)` says which."""
    import datetime
    import fcntl
    import socket

    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
    handle.flush()
    return handle


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds the lock of `path`, as its holder wrote it (see hold_lock)."""
    try:
        return Path(path).read_text().strip() or "another process"
    except OSError:
        return "another process"
