"""Memory mode once per node: the node's first rank decodes, the others map its file."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from distvit.data import shared_split
from distvit.data.manifest import read_manifest
from distvit.data.memory import load_split
from distvit.errors import DataError


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
    assert files == ["train.labels.npy", "train.u8"]  # one copy on the node, no temporary left


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
