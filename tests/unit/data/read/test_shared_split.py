"""Memory mode once per node: the node's first rank decodes, the others map its file."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch

from distvit.data.manifest import read_manifest
from distvit.data.read import shared_split
from distvit.data.read.memory import load_split
from distvit.errors import DataError

CPU = torch.device("cpu")


@pytest.fixture
def two_local_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(shared_split, "shared_folder", lambda: tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    return tmp_path / "shm"


def test_the_first_rank_decodes_and_the_others_map_the_same_bytes(small_dataset, two_local_ranks, monkeypatch):
    manifest = read_manifest(small_dataset)
    expected = load_split(small_dataset, manifest, "train")
    monkeypatch.setenv("LOCAL_RANK", "0")
    first = shared_split.load_split_once_per_node(small_dataset, manifest, "train")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(shared_split, "load_split", lambda *a: pytest.fail("a second rank must not decode"))
    other = shared_split.load_split_once_per_node(small_dataset, manifest, "train")
    assert torch.equal(first.images, expected.images) and torch.equal(other.images, expected.images)
    assert torch.equal(other.labels, expected.labels)
    files = sorted(p.name.rsplit("-", 1)[-1] for p in two_local_ranks.iterdir())
    # one copy on the node, no temporary left; the first rank's pid and its decision for the waiting ranks
    assert files == ["train.labels.npy", "train.pid", "train.plan", "train.u8"]


def test_a_decode_error_on_the_first_rank_stops_the_others_with_its_message(
    small_dataset, tmp_path, two_local_ranks, monkeypatch
):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    manifest = read_manifest(data)
    (data / manifest.splits["train"].shards[0].name).write_bytes(b"not a tar" * 1000)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DataError) as first:
        shared_split.load_split_once_per_node(data, manifest, "train")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DataError) as other:
        shared_split.load_split_once_per_node(data, manifest, "train")
    assert str(other.value) == str(first.value)


def test_leftovers_of_a_gone_launch_are_removed_and_nothing_else(two_local_ranks):
    gone = two_local_ranks / "distvit-999999999-0123456789ab-train.u8"
    half_written = two_local_ranks / "distvit-999999999-0123456789ab-train.u8.tmp"
    running = two_local_ranks / f"distvit-{os.getpid()}-0123456789ab-train.u8"
    other = two_local_ranks / "distvit-notes.txt"
    for path in (gone, half_written, running, other):
        path.write_bytes(b"x")
    shared_split._remove_leftovers(two_local_ranks)
    assert not gone.exists() and not half_written.exists() and running.exists() and other.exists()


def test_another_users_leftovers_are_left_alone(two_local_ranks, monkeypatch):
    """/dev/shm is shared by every user of the node: a gone launch's files that another user owns stay
    (and removing them, which a sticky folder refuses, does not stop this run)."""
    theirs = two_local_ranks / "distvit-999999999-0123456789ab-train.u8"
    theirs.write_bytes(b"x")
    monkeypatch.setattr(shared_split.os, "getuid", lambda: theirs.stat().st_uid + 1)  # the file is not ours
    shared_split._remove_leftovers(two_local_ranks)
    assert theirs.read_bytes() == b"x"


FILLER = 600 * 1024
"""What other users hold in the 1 MiB shared memory below: ~0.4 MiB stays free, the split needs ~0.6 MiB."""


@pytest.fixture
def small_shm(tmp_path, monkeypatch):
    """Two local ranks sharing through a 1 MiB tmpfs (a container's /dev/shm in miniature), mostly used by
    someone else, named by $DISTVIT_SHARED_MEMORY; a first rank that fails is noticed in seconds."""
    from tests.support.disks import small_tmpfs

    with small_tmpfs(tmp_path / "shm", 1) as folder:
        (folder / "someone-elses").write_bytes(b"x" * FILLER)
        monkeypatch.setenv("DISTVIT_SHARED_MEMORY", str(folder))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(shared_split, "WAIT_S", 10.0)
        yield folder


def host_memory(monkeypatch, megabytes: float) -> None:
    monkeypatch.setattr(shared_split, "available_host_memory", lambda: int(megabytes * 2**20))


def as_rank(monkeypatch, rank: int, load):
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    return load()


def test_too_little_shared_memory_means_a_private_copy_per_rank_and_one_note(
    small_dataset, small_shm, monkeypatch, capsys
):
    manifest = read_manifest(small_dataset)
    expected = load_split(small_dataset, manifest, "train")
    load = lambda: shared_split.load_split_once_per_node(small_dataset, manifest, "train")  # noqa: E731
    first, other = as_rank(monkeypatch, 0, load), as_rank(monkeypatch, 1, load)
    assert torch.equal(first.images, expected.images) and torch.equal(other.images, expected.images)
    assert torch.equal(other.labels, expected.labels)
    assert capsys.readouterr().err == (
        f"distvit: note: {small_shm} holds 1.0 MiB (0.4 MiB free), too little for the node's 2 ranks to share "
        "split 'train' (0.6 MiB decoded): each rank decodes its own copy in private memory (2 x 0.6 MiB). With "
        "more shared memory (docker run --shm-size=..., or a larger /dev/shm on the node) they would share one.\n"
    )
    assert not list(small_shm.glob("*.u8*"))


def test_a_split_that_fits_neither_shared_nor_private_memory_stops_every_rank_with_one_error(
    small_dataset, small_shm, monkeypatch
):
    host_memory(monkeypatch, 1.0)  # two private copies need 1.2 MiB
    manifest = read_manifest(small_dataset)
    load = lambda: shared_split.load_split_once_per_node(small_dataset, manifest, "train")  # noqa: E731
    with pytest.raises(DataError) as first:
        as_rank(monkeypatch, 0, load)
    assert str(first.value) == (
        f"data.mode=memory: {small_shm} holds 1.0 MiB (0.4 MiB free), too little for the node's 2 ranks to share "
        "split 'train' (0.6 MiB decoded), and 2 private copies (1.2 MiB) exceed the host's available memory "
        "(1.0 MiB). Give the machine more shared memory (docker run --shm-size=..., or a larger /dev/shm on the "
        "node), or use data.mode=stream."
    )
    started = time.monotonic()
    with pytest.raises(DataError) as other:
        as_rank(monkeypatch, 1, load)
    assert str(other.value) == str(first.value) and time.monotonic() - started < 2


def test_auto_mode_counts_shared_memory(small_dataset, small_shm, monkeypatch, tmp_path, capsys):
    """One copy fits the host's third, two private ones do not, and shared memory is too small: stream."""
    from distvit.data.read.loader import MemoryBatches, StreamBatches, fits_in_memory, open_batches

    host_memory(monkeypatch, 3.0)
    manifest = read_manifest(small_dataset)
    assert not fits_in_memory(manifest, "train")

    def open_train():
        return open_batches(small_dataset, manifest, "train", mode="auto", num_workers=0, device=CPU, resize_to=32)

    assert isinstance(as_rank(monkeypatch, 0, open_train), StreamBatches)
    assert isinstance(as_rank(monkeypatch, 1, open_train), StreamBatches)
    assert capsys.readouterr().err == (
        f"distvit: note: data.mode=auto streams split 'train' (0.6 MiB decoded): {small_shm} holds 1.0 MiB "
        "(0.4 MiB free), too little for the node's 2 ranks to share it, and 2 private copies (1.2 MiB) exceed a "
        "third of the host's available memory. With more shared memory (docker run --shm-size=..., or a larger "
        "/dev/shm on the node) it is held in memory.\n"
    )
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    monkeypatch.setenv("DISTVIT_SHARED_MEMORY", str(roomy))
    assert fits_in_memory(manifest, "train")
    assert isinstance(as_rank(monkeypatch, 0, open_train), MemoryBatches)
    assert isinstance(as_rank(monkeypatch, 1, open_train), MemoryBatches)
    assert [p.suffix for p in roomy.glob("*train.u8")] == [".u8"]  # one copy, shared


@pytest.mark.parametrize("host_mib", [100.0, 1.0])
def test_shared_memory_filling_up_while_the_first_rank_writes(small_dataset, small_shm, monkeypatch, capsys, host_mib):
    """The folder had room when checked, another job took it meanwhile (the kernel's ENOSPC): private
    copies where they fit, else one error that the waiting rank gets too (not an hour's wait)."""
    host_memory(monkeypatch, host_mib)
    monkeypatch.setattr(shared_split, "placement", lambda *a, **k: (shared_split.SHARED, None))
    manifest = read_manifest(small_dataset)
    expected = load_split(small_dataset, manifest, "train")
    load = lambda: shared_split.load_split_once_per_node(small_dataset, manifest, "train")  # noqa: E731
    if host_mib == 100.0:
        first, other = as_rank(monkeypatch, 0, load), as_rank(monkeypatch, 1, load)
        assert torch.equal(first.images, expected.images) and torch.equal(other.images, expected.images)
        assert capsys.readouterr().err.startswith(
            f"distvit: note: writing split 'train' to {small_shm} failed (No space left on device): each rank "
            "decodes its own copy in private memory (2 x 0.6 MiB)."
        )
        return
    with pytest.raises(DataError) as first:
        as_rank(monkeypatch, 0, load)
    assert str(first.value).startswith(f"sharing split 'train' through {small_shm} failed (No space left on device")
    assert "--shm-size" in str(first.value) and "data.mode=stream" in str(first.value)
    started = time.monotonic()
    with pytest.raises(DataError) as other:
        as_rank(monkeypatch, 1, load)
    assert str(other.value) == str(first.value) and time.monotonic() - started < 2
    assert not list(small_shm.glob("*.tmp"))


def test_a_waiting_rank_notices_a_dead_first_rank_in_seconds(small_dataset, two_local_ranks, monkeypatch):
    """The first rank killed (the OOM killer) before it could write why: its pid file names it."""
    from distvit.data.node import session_id

    monkeypatch.setattr(shared_split, "WAIT_S", 30.0)
    manifest = read_manifest(small_dataset)
    dead = _dead_pid()
    monkeypatch.setenv("LOCAL_RANK", "1")
    stem = f"distvit-{session_id()}-{manifest.fingerprint()[:12]}-train"
    (two_local_ranks / f"{stem}.pid").write_text(str(dead))
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        shared_split.load_split_once_per_node(small_dataset, manifest, "train")
    assert time.monotonic() - started < 5
    assert str(err.value) == (
        f"the first rank of this node (pid {dead}) ended before it shared split 'train' (its own message says why)."
    )


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
