"""distvit.data.prepare.writer: reproducible shard bytes, replaced and interrupted output."""

from __future__ import annotations

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.memory import load_split
from distvit.errors import DataError


def test_same_input_gives_same_bytes(tmp_path):
    first = prepare_synthetic(tmp_path / "a", train_size=60, test_size=20, seed=1)
    second = prepare_synthetic(tmp_path / "b", train_size=60, test_size=20, seed=1)
    assert [s.sha256 for s in first.splits["train"].shards] == [s.sha256 for s in second.splits["train"].shards]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_rerun_replaces_the_dataset_and_only_its_files(tmp_path):
    """The new shards move in under names the old manifest does not use; the manifest commits; then only
    the files the old manifest listed go. A user's own tar files beside the dataset stay."""
    ds = tmp_path / "ds"
    prepare_synthetic(ds, train_size=200, test_size=20, samples_per_shard=50)
    mine = {"train-backup-2024.tar": b"my backup", "test-notes.tar": b"mine too", "train-00009.tar": b"also mine"}
    for name, data in mine.items():
        (ds / name).write_bytes(data)
    manifest = prepare_synthetic(ds, train_size=60, test_size=20, samples_per_shard=50)
    new = ["test-b-00000.tar", "train-b-00000.tar", "train-b-00001.tar"]
    assert sorted(s.name for split in manifest.splits.values() for s in split.shards) == new
    assert _files(ds) == sorted(["manifest.json", *new, *mine])
    assert all((ds / name).read_bytes() == data for name, data in mine.items())
    assert len(load_split(ds, read_manifest(ds), "train")) == 60
    prepare_synthetic(ds, train_size=100, test_size=20, samples_per_shard=50)  # and back: the "b-" files go
    assert _files(ds) == sorted(["manifest.json", "test-c-00000.tar", "train-c-00000.tar", "train-c-00001.tar", *mine])


def test_a_killed_prepare_leaves_the_old_dataset_and_the_next_one_cleans_up(tmp_path, capsys):
    """Killed while writing: the staging folder is all that is left beside the intact old dataset; killed
    while swapping: the next prepare finishes or undoes the swap from its record. Each time it says so."""
    ds = tmp_path / "ds"
    old = prepare_synthetic(ds, train_size=60, test_size=20, samples_per_shard=25)
    before = {name: (ds / name).read_bytes() for name in _files(ds)}
    (ds / ".distvit-prepare").mkdir()
    (ds / ".distvit-prepare" / ".distvit-staging").write_text("")  # what prepare writes first there
    (ds / ".distvit-prepare" / "train-b-00000.tar.tmp").write_bytes(b"half a shard")  # killed while writing
    assert {name: (ds / name).read_bytes() for name in _files(ds) if name != ".distvit-prepare"} == before
    assert len(load_split(ds, read_manifest(ds), "train")) == 60  # the old dataset reads as before
    manifest = prepare_synthetic(ds, train_size=60, test_size=20, samples_per_shard=25)
    assert (
        "removed " + str(ds / ".distvit-prepare") + ", left by a prepare that did not finish" in capsys.readouterr().err
    )
    assert _files(ds) == [
        "manifest.json",
        "test-b-00000.tar",
        "train-b-00000.tar",
        "train-b-00001.tar",
        "train-b-00002.tar",
    ]
    assert [s.sha256 for s in manifest.splits["train"].shards] == [s.sha256 for s in old.splits["train"].shards]

    # killed after the new manifest was committed, before the old shards were deleted
    import json

    (ds / "train-00000.tar").write_bytes(b"an old shard")
    (ds / ".distvit-prepare.json").write_text(
        json.dumps({"new": {"train-b-00000.tar": 1}, "old": {"train-00000.tar": 12}})
    )
    prepare_synthetic(ds, train_size=60, test_size=20, samples_per_shard=25)
    assert "removed 1 of the old dataset's shards" in capsys.readouterr().err
    assert _files(ds) == ["manifest.json", "test-00000.tar", "train-00000.tar", "train-00001.tar", "train-00002.tar"]


def test_the_swap_deletes_only_what_is_still_distvits_and_survives_a_full_disk(tmp_path, capsys, monkeypatch):
    """Deletions check the size distvit recorded: a user's file put under a recorded name stays. A swap
    stopped before its commit (a full disk writing the manifest) leaves the old dataset readable, and the
    next prepare takes the moved-in shards back out. A folder named like the staging one but not made by
    prepare is never removed."""
    import json

    from distvit.data.prepare import writer

    ds = tmp_path / "ds"
    prepare_synthetic(ds, train_size=60, test_size=20, samples_per_shard=25)
    (ds / "train-00001.tar").write_bytes(b"my own file now")  # listed by the manifest, but not its bytes
    prepare_synthetic(ds, train_size=40, test_size=20, samples_per_shard=25)
    assert (ds / "train-00001.tar").read_bytes() == b"my own file now"
    assert not (ds / "train-00000.tar").exists() and not (ds / "train-00002.tar").exists()
    before = {name: (ds / name).read_bytes() for name in _files(ds)}

    def full_disk(folder, manifest):
        raise OSError(28, "No space left on device", str(folder / "manifest.json.tmp"))

    monkeypatch.setattr(writer, "write_manifest", full_disk)
    with pytest.raises(DataError, match=r"No space left on device.*\); \d+ MB free there\. The folder's previous"):
        prepare_synthetic(ds, train_size=60, test_size=20, samples_per_shard=25)
    monkeypatch.undo()
    assert len(load_split(ds, read_manifest(ds), "train")) == 40  # the old dataset, whole
    assert {name: (ds / name).read_bytes() for name in before} == before
    record = json.loads((ds / ".distvit-prepare.json").read_text())
    # moved in under the next free names (train-00001.tar, the user's, holds the first generation's)
    assert sorted(record["new"]) == ["test-c-00000.tar", "train-c-00000.tar", "train-c-00001.tar", "train-c-00002.tar"]
    assert all((ds / name).is_file() for name in record["new"])
    capsys.readouterr()
    prepare_synthetic(ds, train_size=40, test_size=20, samples_per_shard=25)
    assert "removed 4 of the unfinished new dataset's shards" in capsys.readouterr().err
    assert not (ds / "train-c-00002.tar").exists()  # the unfinished 3-shard set went (the new one has 2)
    assert len(load_split(ds, read_manifest(ds), "train")) == 40
    assert (ds / "train-00001.tar").read_bytes() == b"my own file now"

    (ds / ".distvit-prepare").mkdir()
    (ds / ".distvit-prepare" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"\.distvit-prepare exists and is not distvit's"):
        prepare_synthetic(ds, train_size=40, test_size=20, samples_per_shard=25)
    assert (ds / ".distvit-prepare" / "notes.txt").read_text() == "mine"
