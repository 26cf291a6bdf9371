"""CIFAR-10 importer on archives the tests generate in the official layout and pickle format."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from distvit.data.manifest import read_manifest
from distvit.data.prepare import cifar10
from distvit.data.prepare.cifar10 import prepare_cifar10, write_order
from distvit.data.read.memory import load_split
from distvit.errors import DataError
from tests.support.helpers import run_cli

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 12


def make_batches(seed=0):
    """Official structure: dicts with bytes keys, uint8 N x 3072 rows (R, G, B planes), int labels."""
    rng = np.random.default_rng(seed)
    files = {}
    for index, name in enumerate(cifar10.TRAIN_FILES + cifar10.TEST_FILES):
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=PER_BATCH)]
        files[name] = pickle.dumps(
            {
                b"batch_label": f"batch {index}".encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [f"img_{i}.png".encode() for i in range(PER_BATCH)],
            },
            protocol=2,
        )
    files["batches.meta"] = pickle.dumps(
        {b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, protocol=2
    )
    return files


def write_archive(path, files, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(cifar10.FOLDER)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{cifar10.FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for info, payload in extra:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def official_arrays(files, names):
    parts = [pickle.loads(files[n], encoding="bytes") for n in names]
    images = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.concatenate([p[b"labels"] for p in parts])


@pytest.fixture()
def archive(tmp_path):
    files = make_batches()
    return write_archive(tmp_path / "cifar-10-python.tar.gz", files), files


def test_archive_round_trips_exact_pixels_and_labels(archive, tmp_path):
    path, files = archive
    manifest = prepare_cifar10(tmp_path / "out", source=str(path), skip_checksum=True, samples_per_shard=25, seed=4)
    assert manifest.classes == CLASSES and manifest.image_size == (32, 32)
    assert {name: split.num_samples for name, split in manifest.splits.items()} == {"train": 60, "test": 12}
    assert (
        manifest.source["checksum"] == "skipped"
        and manifest.source["md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    )
    for split_index, (split, names) in enumerate((("train", cifar10.TRAIN_FILES), ("test", cifar10.TEST_FILES))):
        images, labels = official_arrays(files, names)
        order = write_order(len(labels), seed=4, split_index=split_index)
        assert not np.array_equal(order, np.arange(len(labels)))  # seeded shuffle, not the source order
        loaded = load_split(tmp_path / "out", read_manifest(tmp_path / "out"), split)
        assert torch.equal(loaded.images, torch.from_numpy(images[order]))
        assert torch.equal(loaded.labels, torch.from_numpy(labels[order].astype(np.int64)))


def test_checksum_mismatch_is_refused_unless_skipped(archive, tmp_path):
    path, _ = archive
    with pytest.raises(
        DataError, match=r"has md5 .* the official cifar-10-python.tar.gz has c58f3010.*--skip-checksum"
    ):
        prepare_cifar10(tmp_path / "out", source=str(path))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_extracted_folder_and_per_file_checksums(archive, tmp_path):
    _, files = archive
    folder = tmp_path / "src" / cifar10.FOLDER
    folder.mkdir(parents=True)
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    with pytest.raises(DataError, match="data_batch_1 does not have the official md5"):
        prepare_cifar10(tmp_path / "out", source=str(tmp_path / "src"))
    manifest = prepare_cifar10(tmp_path / "out", source=str(tmp_path / "src"), skip_checksum=True)
    assert manifest.splits["train"].num_samples == 5 * PER_BATCH


def test_download_code_path_on_a_file_url(archive, tmp_path):
    path, _ = archive
    manifest = prepare_cifar10(tmp_path / "out", source=path.as_uri(), skip_checksum=True)
    assert manifest.source["url"] == path.as_uri()
    assert (tmp_path / "out" / ".download" / "cifar-10-python.tar.gz").read_bytes() == path.read_bytes()
    with pytest.raises(DataError, match="could not download .*--source /path/to/cifar-10-python.tar.gz"):
        prepare_cifar10(tmp_path / "out2", source=(tmp_path / "absent.tar.gz").as_uri())
    assert not list((tmp_path / "out2" / ".download").glob("*.part"))


class Exploit:
    """A pickle that calls os.system when loaded with plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    files = make_batches()
    files["data_batch_3"] = pickle.dumps({b"data": Exploit(marker), b"labels": []}, protocol=2)
    path = write_archive(tmp_path / "evil.tar.gz", files)
    with pytest.raises(DataError, match="data_batch_3: refusing to load global posix.system"):
        prepare_cifar10(tmp_path / "out", source=str(path), skip_checksum=True)
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_tar_members_pointing_outside_are_refused(tmp_path, kind):
    info = tarfile.TarInfo(
        {"dotdot": f"{cifar10.FOLDER}/../../escaped", "absolute": "/tmp/escaped"}.get(kind, f"{cifar10.FOLDER}/link")
    )
    payload = b"x"
    if kind in ("symlink", "hardlink"):
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = "../../../etc/passwd"
        payload = None
    else:
        info.size = 1
    work = tmp_path / "work"
    work.mkdir()
    path = write_archive(work / "evil.tar.gz", make_batches(), extra=[(info, payload)])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="refusing a tampered archive"):
        prepare_cifar10(work / "out", source=str(path), skip_checksum=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (work / "out" / "manifest.json").exists()


def test_cli_prepare_cifar10(archive, tmp_path):
    path, _ = archive
    result = run_cli(["prepare", "cifar10", "--out", str(tmp_path / "out"), "--source", str(path)])
    assert result.returncode == 2 and "--skip-checksum" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["prepare", "cifar10", "--out", str(tmp_path / "out"), "--source", str(path), "--skip-checksum"])
    assert result.returncode == 0, result.stderr
    assert "train 60 (1 shards), test 12 (1 shards); 10 classes, 32x32 px" in result.stdout


def test_numpy_objects_are_never_built_from_the_pickle(tmp_path):
    """A dtype with a forged state can turn bytes into pointers: only plain numeric arrays are rebuilt,
    by distvit itself; structured, object and string arrays are refused."""
    for hostile in (np.zeros(4, dtype=[("a", "V8")]), np.array([object()], dtype=object), np.zeros(2, dtype="U3")):
        files = make_batches()
        files["data_batch_2"] = pickle.dumps({b"data": hostile, b"labels": [0]}, protocol=2)
        path = write_archive(tmp_path / "evil.tar.gz", files)
        with pytest.raises(DataError, match="data_batch_2: refusing (numpy dtype|to load global __builtin__.object)"):
            prepare_cifar10(tmp_path / "out", source=str(path), skip_checksum=True)


@pytest.mark.parametrize("case", ["directory member", "text labels", "three classes"])
def test_tampered_content_gives_clear_errors(tmp_path, case):
    files = make_batches()
    extra = []
    if case == "directory member":
        del files["test_batch"]
        folder = tarfile.TarInfo(f"{cifar10.FOLDER}/test_batch")
        folder.type = tarfile.DIRTYPE
        extra = [(folder, None)]
        message = "lacks cifar-10-batches-py/test_batch"
    elif case == "text labels":
        files["data_batch_1"] = pickle.dumps(
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"x", b"y"]}, protocol=2
        )
        message = "b'labels' must be a list of integers"
    else:
        files["batches.meta"] = pickle.dumps({b"label_names": [b"a", b"b", b"c"]}, protocol=2)
        message = "CIFAR-10 has 10 label names, this file lists 3"
    path = write_archive(tmp_path / "t.tar.gz", files, extra=extra)
    with pytest.raises(DataError, match=message):
        prepare_cifar10(tmp_path / "out", source=str(path), skip_checksum=True)
