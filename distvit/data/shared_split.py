"""Memory mode once per node: the split is decoded by the node's first rank into a uint8 file in shared
memory (/dev/shm), and every rank of the node maps that file instead of decoding the split itself. With
8 ranks on a node that is 1x the decoding time and host memory instead of 8x. (On a GPU each rank then
copies the split to its own device; on a CPU the ranks index the one mapping.)

Files, named by the launch (its session) and the manifest's fingerprint, in /dev/shm (or the temporary
folder where there is none): `distvit-SESSION-FP-SPLIT.u8` (images), `.labels.npy`, and `.error` (why
the decode failed: every waiting rank stops with it). The first rank removes them when it exits, and
at start any left by a launch whose launcher is gone.
"""

from __future__ import annotations

import atexit
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from distvit.data.manifest import Manifest
from distvit.data.memory import SplitTensors, load_split
from distvit.data.node import local_ranks, session_id
from distvit.errors import DataError

WAIT_S = 3600.0
"""How long the other ranks wait for the first rank's decode of a split."""
_LEFTOVER = re.compile(r"distvit-(\d+)-[0-9a-f]{12}-[A-Za-z0-9_-]+\.(u8|labels\.npy|error)(\.tmp)?")


def shared_folder() -> Path:
    return (
        Path("/dev/shm")
        if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK)
        else Path(tempfile.gettempdir())
    )


def load_split_once_per_node(dataset_dir: str | os.PathLike, manifest: Manifest, split: str) -> SplitTensors:
    """The split as load_split gives it; decoded once per node when a launcher started several ranks."""
    rank, ranks = local_ranks()
    if ranks == 1:
        return load_split(dataset_dir, manifest, split)
    folder = shared_folder()
    stem = folder / f"distvit-{session_id()}-{manifest.fingerprint()[:12]}-{split}"
    images, labels, error = (Path(f"{stem}.{suffix}") for suffix in ("u8", "labels.npy", "error"))
    if rank == 0:
        _remove_leftovers(folder)
        labels_tmp, images_tmp = Path(f"{labels}.tmp"), Path(f"{images}.tmp")
        ours = (images, labels, error, images_tmp, labels_tmp)
        atexit.register(lambda: [p.unlink(missing_ok=True) for p in ours])
        try:
            data = load_split(dataset_dir, manifest, split)
        except DataError as err:
            error.write_text(str(err))
            raise
        with open(labels_tmp, "wb") as handle:  # a handle: np.save would append .npy to the name
            np.save(handle, data.labels.numpy(), allow_pickle=False)
        os.replace(labels_tmp, labels)  # labels first: a complete image file means both are there
        data.images.numpy().tofile(images_tmp)
        os.replace(images_tmp, images)
        return data
    deadline = time.monotonic() + WAIT_S
    while not images.exists():
        if error.exists():
            raise DataError(error.read_text())
        if time.monotonic() > deadline:
            raise DataError(f"the first rank of this node did not decode split '{split}' within {WAIT_S:.0f} s.")
        time.sleep(0.05)
    height, width = manifest.image_size
    count = manifest.splits[split].num_samples
    mapped = np.memmap(images, dtype=np.uint8, mode="r", shape=(count, height, width, manifest.channels))
    with warnings.catch_warnings():  # read-only by design: nothing writes into a split
        warnings.simplefilter("ignore", UserWarning)
        return SplitTensors(torch.from_numpy(mapped), torch.from_numpy(np.load(labels, allow_pickle=False)))


def _remove_leftovers(folder: Path) -> None:
    """Files of this kind whose launch is gone (a kill): never another user's (in /dev/shm, shared by all
    users and sticky, removing theirs would fail) or a running launch's."""
    for path in folder.glob("distvit-*"):
        match = _LEFTOVER.fullmatch(path.name)
        if not match or not path.is_file() or path.stat().st_uid != os.getuid() or _alive(int(match.group(1))):
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError:  # removed or locked by someone else meanwhile: a leftover, not this run's problem
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
