"""Memory mode once per node: the split is decoded by the node's first rank into a uint8 file in shared
memory (/dev/shm), and every rank of the node maps that file instead of decoding the split itself. With
8 ranks on a node that is 1x the decoding time and host memory instead of 8x. (On a GPU each rank then
copies the split to its own device; on a CPU the ranks index the one mapping.)

Where the split goes is the first rank's decision, published for the others (`PLAN`): shared when the
folder has the room (its size and what is free: a container's /dev/shm is 64 MB by default, CIFAR-10's
training split 150 MB), else one private copy per rank when the host's memory allows (a one-line note),
else with data.mode=auto the split is streamed (a note), and with data.mode=memory one error naming
--shm-size.

Files, named by the launch (its session) and the manifest's fingerprint, in /dev/shm (or the temporary
folder where there is none; $DISTVIT_SHARED_MEMORY overrides it): `distvit-SESSION-FP-SPLIT.u8`
(images), `.labels.npy`, `.pid` (the first rank's process: a waiting rank that finds it gone stops in
seconds, not after WAIT_S), `.plan` (the decision) and `.error` (why the first rank failed: every
waiting rank stops with it). The first rank removes them when it exits (`.error` stays for the ranks
still reading it), and at start any left by a launch whose launcher is gone.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from distvit.data.manifest import Manifest
from distvit.data.node import available_host_memory, launch, local_ranks, session_id
from distvit.data.read.memory import SplitTensors, load_split
from distvit.errors import DataError

WAIT_S = 3600.0
"""How long the other ranks wait for the first rank's decode of a split (while it is alive)."""
SHARED_MEMORY_ENV = "DISTVIT_SHARED_MEMORY"
"""A folder to share splits in instead of /dev/shm (tests: a small tmpfs)."""
MEMORY_LIMIT_BYTES = 4 << 30
"""The most decoded bytes data.mode=auto holds in memory when it cannot read the host's free memory."""
SHARED, PRIVATE, STREAM = "shared", "private", "stream"
_LEFTOVER = re.compile(r"distvit-(\d+)-[0-9a-f]{12}-[A-Za-z0-9_-]+\.(u8|labels\.npy|error|pid|plan)(\.tmp)?")
_MIB = 2**20
_MARGIN = 2**16
"""Room beyond the split's bytes: whole pages, and the small files beside it."""


def _mib(size: int) -> str:
    return f"{size / _MIB:.1f} MiB" if size < 10 * _MIB else f"{size / _MIB:.0f} MiB"


def shared_folder() -> Path:
    override = os.environ.get(SHARED_MEMORY_ENV)
    if override:
        return Path(override)
    return (
        Path("/dev/shm")
        if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK)
        else Path(tempfile.gettempdir())
    )


def split_bytes(manifest: Manifest, split: str) -> int:
    """What the decoded split takes in memory: uint8 images and int64 labels (with the .npy header)."""
    height, width = manifest.image_size
    count = manifest.splits[split].num_samples
    return count * height * width * manifest.channels + count * 8 + 128


def host_budget(auto: bool = True) -> int:
    """The host memory a decoded split may take: data.mode=auto, a third of what is available (the rest
    is the model's, the loader's, the system's); data.mode=memory (the user's choice), all of it."""
    host = available_host_memory()
    if not host:
        return MEMORY_LIMIT_BYTES
    return host // 3 if auto else host


def placement(manifest: Manifest, split: str, ranks: int, auto: bool) -> tuple[str, str | None]:
    """Where the node's `ranks` ranks hold the decoded split: SHARED (one copy in the shared folder),
    PRIVATE (one copy each) or STREAM (data.mode=auto only: neither fits); and a one-line note when not
    SHARED. A DataError (data.mode=memory) when it fits nowhere."""
    needed = split_bytes(manifest, split)
    folder = shared_folder()
    try:
        stats = os.statvfs(folder)
    except OSError:  # cannot tell (not Linux): try, and fail with the folder's own error
        return SHARED, None
    size, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
    if needed + _MARGIN <= free:
        return SHARED, None
    what = f"split '{split}' ({_mib(needed)} decoded)"
    room = f"{folder} holds {_mib(size)} ({_mib(free)} free)"
    budget = host_budget(auto)
    more = "more shared memory (docker run --shm-size=..., or a larger /dev/shm on the node)"
    if ranks * needed <= budget:
        return PRIVATE, (
            f"distvit: note: {room}, too little for the node's {ranks} ranks to share {what}: each rank decodes "
            f"its own copy in private memory ({ranks} x {_mib(needed)}). With {more} they would share one."
        )
    private = f"{ranks} private copies ({_mib(ranks * needed)}) exceed"
    if auto:
        return STREAM, (
            f"distvit: note: data.mode=auto streams {what}: {room}, too little for the node's {ranks} ranks to "
            f"share it, and {private} a third of the host's available memory. With {more} it is held in memory."
        )
    raise DataError(
        f"data.mode=memory: {room}, too little for the node's {ranks} ranks to share {what}, and {private} "
        f"the host's available memory ({_mib(budget)}). Give the machine {more}, or use data.mode=stream."
    )


def load_split_once_per_node(
    dataset_dir: str | os.PathLike, manifest: Manifest, split: str, auto_fits: bool | None = None
) -> SplitTensors | None:
    """The split as load_split gives it; decoded once per node when a launcher started several ranks.
    `auto_fits`: None with data.mode=memory; with data.mode=auto this rank's own verdict (host memory,
    its GPU: distvit.data.read.loader.fits_in_memory), and None is returned where the split is streamed."""
    rank, ranks = local_ranks()
    if ranks == 1 or (rank and auto_fits is False):  # a rank that streams on its own needs no decision
        return None if auto_fits is False else load_split(dataset_dir, manifest, split)
    folder = shared_folder()
    # An elastic restart of the ranks keeps the launcher (the session): its attempt keeps files apart.
    attempt = launch().restart
    name = f"distvit-{session_id()}-{manifest.fingerprint()[:12]}-{split}" + ("" if attempt == "0" else f"-{attempt}")
    stem = folder / name
    files = {suffix: Path(f"{stem}.{suffix}") for suffix in ("u8", "labels.npy", "error", "pid", "plan")}
    if rank == 0:
        return _first_rank(dataset_dir, manifest, split, ranks, auto_fits, folder, files)
    return _other_rank(dataset_dir, manifest, split, files)


def _first_rank(dataset_dir, manifest, split, ranks, auto_fits, folder, files) -> SplitTensors | None:
    _remove_leftovers(folder)
    done = []  # once the others have what they need, the pid file goes too; else it tells them this rank is gone
    kept = ("error", "pid")
    ours = [path for suffix, path in files.items() if suffix not in kept] + [Path(f"{p}.tmp") for p in files.values()]
    atexit.register(lambda: [p.unlink(missing_ok=True) for p in ours + ([files["pid"]] if done else [])])
    try:
        _publish(files["pid"], str(os.getpid()))
        if auto_fits is False:
            kind, note = STREAM, None  # this rank's own memory or GPU says no: the node streams
        else:
            kind, note = placement(manifest, split, ranks, auto=auto_fits is not None)
        _publish(files["plan"], kind)
        if note:
            print(note, file=sys.stderr, flush=True)
        data = None if kind == STREAM else load_split(dataset_dir, manifest, split)
        if kind == SHARED:
            _write_shared(data, files, split, ranks, auto_fits is not None)
        done.append(True)
        return data
    except Exception as err:  # every waiting rank stops with it (a stop request is seen by its pid instead)
        message = _failure(err, folder, split) if isinstance(err, OSError) else str(err)
        try:
            files["error"].write_text(message if isinstance(err, (OSError, DataError)) else f"{_BUG} ({message})")
        except OSError:  # a full folder: the waiting ranks see this rank gone (its pid)
            pass
        if isinstance(err, OSError):
            raise DataError(message) from None
        raise  # a DataError says it all; anything else is a bug and keeps its traceback on this rank


def _write_shared(data: SplitTensors, files: dict[str, Path], split: str, ranks: int, auto: bool) -> None:
    """The node's copy: labels first, then the images (a complete image file means both are there). Should
    the folder fill up meanwhile (another job), the ranks fall back to private copies where they fit."""
    labels_tmp, images_tmp = Path(f"{files['labels.npy']}.tmp"), Path(f"{files['u8']}.tmp")
    try:
        with open(labels_tmp, "wb") as handle:  # a handle: np.save would append .npy to the name
            np.save(handle, data.labels.numpy(), allow_pickle=False)
        os.replace(labels_tmp, files["labels.npy"])
        with open(images_tmp, "wb") as handle:  # a plain write: a full folder is the kernel's ENOSPC, named
            handle.write(data.images.numpy().data)
        os.replace(images_tmp, files["u8"])
    except OSError as err:
        for path in (labels_tmp, images_tmp, files["labels.npy"]):
            path.unlink(missing_ok=True)
        needed = data.images.numel() + data.labels.numel() * 8
        if ranks * needed > host_budget(auto):
            raise DataError(_failure(err, files["u8"].parent, split)) from None
        _publish(files["plan"], PRIVATE)
        print(
            f"distvit: note: writing split '{split}' to {files['u8'].parent} failed ({err.strerror or err}): each "
            f"rank decodes its own copy in private memory ({ranks} x {_mib(needed)}).",
            file=sys.stderr,
            flush=True,
        )


_BUG = "the first rank of this node failed while decoding the split (its traceback says where)"


def _failure(err: OSError, folder: Path, split: str) -> str:
    where = f": {err.filename}" if err.filename else ""
    if err.filename and Path(err.filename).parent != folder:  # the dataset's, not the shared folder's
        return f"reading split '{split}' failed ({err.strerror or err}{where})."
    return (
        f"sharing split '{split}' through {folder} failed ({err.strerror or err}{where}). Give the machine more "
        "shared memory (docker run --shm-size=..., or a larger /dev/shm on the node), or use data.mode=stream."
    )


def _publish(path: Path, text: str) -> None:
    """Whole or not at all for the waiting ranks: a temporary file, then a rename."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _other_rank(dataset_dir, manifest, split, files) -> SplitTensors | None:
    deadline = time.monotonic() + WAIT_S
    images, error = files["u8"], files["error"]
    while not images.exists():
        if error.exists():
            raise DataError(error.read_text())
        plan = _read(files["plan"])
        if plan == PRIVATE:
            return load_split(dataset_dir, manifest, split)
        if plan == STREAM:
            return None
        gone = _first_rank_gone(files["pid"])
        if gone:
            time.sleep(0.2)  # its .error may be on the way (written before it exits)
            if error.exists():
                raise DataError(error.read_text())
            raise DataError(f"{gone} ended before it shared split '{split}' (its own message says why).")
        if time.monotonic() > deadline:
            raise DataError(f"the first rank of this node did not decode split '{split}' within {WAIT_S:.0f} s.")
        time.sleep(0.05)
    height, width = manifest.image_size
    count = manifest.splits[split].num_samples
    mapped = np.memmap(images, dtype=np.uint8, mode="r", shape=(count, height, width, manifest.channels))
    with warnings.catch_warnings():  # read-only by design: nothing writes into a split
        warnings.simplefilter("ignore", UserWarning)
        return SplitTensors(
            torch.from_numpy(mapped), torch.from_numpy(np.load(files["labels.npy"], allow_pickle=False))
        )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _first_rank_gone(pid_file: Path) -> str | None:
    """Who is gone: the node's first rank (its pid file names it), or before it wrote that, the launcher
    (the session); None while they live."""
    text = _read(pid_file)
    if text and text.isdigit() and not _alive(int(text)):
        return f"the first rank of this node (pid {text})"
    session = int(session_id())
    if not _alive(session):
        return f"the launcher of this node's ranks (pid {session})"
    return None


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
