"""distvit.data.writer: reproducible shard bytes, replaced and interrupted output."""

from __future__ import annotations

from distvit.data.manifest import read_manifest
from distvit.data.memory import load_split
from distvit.data.synthetic import prepare_synthetic


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
    (ds / ".distvit-prepare.json").write_text(json.dumps({"new": ["train-b-00000.tar"], "old": ["train-00000.tar"]}))
    prepare_synthetic(ds, train_size=60, test_size=20, samples_per_shard=25)
    assert "removed 1 of the old dataset's shards" in capsys.readouterr().err
    assert _files(ds) == ["manifest.json", "test-00000.tar", "train-00000.tar", "train-00001.tar", "train-00002.tar"]
