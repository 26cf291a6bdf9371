"""A small real tmpfs for the full-disk tests: the kernel's own ENOSPC, not a patched write."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(where: Path, megabytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `megabytes` at `where` for the block; skips the test where mounting is not
    allowed (not root, or a container without the capability), saying why."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def resize_tmpfs(where: Path, megabytes: int) -> None:
    """Grow (or shrink) a mounted tmpfs in place: space freed, files kept."""
    subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(where)], check=True)
