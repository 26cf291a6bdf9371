"""Damaged samples in a dataset: each one a DataError naming the shard, the sample and the fix, the same in
memory mode and in stream mode (where the sample is read in a DataLoader worker process), never a raw
traceback. The shard's hash is updated to match, as after `data.verify=size` or a deliberate forgery:
these are the checks that hold without hashes."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from distvit.data.manifest import read_manifest, sha256_file
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.loader import StreamBatches
from distvit.data.read.memory import load_split
from distvit.errors import DataError


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_header() -> bytes:
    """A PNG whose header claims 100000 x 100000 px (30 GB decoded) over a few bytes of data."""
    import zlib

    png = bytearray(_png(32, 32))
    png[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width and height
    png[29:33] = zlib.crc32(png[12:29]).to_bytes(4, "big")  # and the chunk's CRC over them
    return bytes(png)


CASES = {
    "label out of range": ("cls", b"12", r"label '12' is not a class index from 0 to 9"),
    "negative label": ("cls", b"-1", r"label '-1' is not a class index from 0 to 9"),
    "label not an integer": ("cls", b"3.0", r"label '3.0' is not a class index from 0 to 9"),
    "image of another size": ("png", _png(16, 16), r"is 16 x 16 px, the manifest says 32 x 32"),
    "undecodable image": ("png", b"\x89PNG not really", r": image cannot be decoded \("),
    "decompression bomb": ("png", _bomb_header(), r": image cannot be decoded \(DecompressionBombError: Image size"),
}


def _damage(dataset, member: str, payload: bytes) -> str:
    """Replace `member` of the train split's 4th sample, keep the manifest's sizes and hashes in step."""
    manifest_path = dataset / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    shard = raw["splits"]["train"]["shards"][0]
    path = dataset / shard["name"]
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    key = sorted({info.name.rsplit(".", 1)[0] for info, _ in members})[3]
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if info.name == f"{key}.{member}":
                data = payload
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard["num_bytes"], shard["sha256"] = path.stat().st_size, sha256_file(path)
    manifest_path.write_text(json.dumps(raw))
    return f"{path} sample {key}"


def _read_stream(dataset):
    manifest = read_manifest(dataset)
    stream = StreamBatches(dataset, manifest, "train", num_workers=1, device=torch.device("cpu"))
    plan = EpochPlan(sequential_order(len(stream)), 10, 1, 0)
    return sum(len(images) for _, images, _ in stream.epoch(plan))


@pytest.fixture()
def dataset(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=40, test_size=20, samples_per_shard=40)
    return tmp_path / "ds"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_damaged_sample_is_one_clear_error(dataset, case, mode):
    member, payload, message = CASES[case]
    where = _damage(dataset, member, payload)
    with pytest.raises(DataError) as err:
        if mode == "memory":
            load_split(dataset, read_manifest(dataset), "train")
        else:
            _read_stream(dataset)
    text = str(err.value)
    assert text.startswith(where) and "\n" not in text and "Traceback" not in text, text
    assert re.search(message, text), text
    assert "again" in text  # the fix: prepare or fetch the dataset again


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_shard_that_is_not_a_tar_is_one_clear_error(dataset, mode):
    manifest_path = dataset / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    shard = raw["splits"]["train"]["shards"][0]
    path = dataset / shard["name"]
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    shard["sha256"] = sha256_file(path)
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=rf"^{path} is not a readable tar shard \(.*\)\. Prepare \(or fetch\)"):
        load_split(dataset, read_manifest(dataset), "train") if mode == "memory" else _read_stream(dataset)


def test_an_intact_dataset_reads_whole_in_both_modes(dataset):
    assert len(load_split(dataset, read_manifest(dataset), "train")) == 40 and _read_stream(dataset) == 40
