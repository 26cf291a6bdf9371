"""JPEG shards: `prepare --format jpeg`, original JPEG bytes kept by the image-folder import, and the
readers' libjpeg-turbo decoding (in workers, or in batches on the training device)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from distvit.data.imagefolder import prepare_imagefolder
from distvit.data.images import decode_stored
from distvit.data.loader import StreamBatches
from distvit.data.manifest import read_manifest
from distvit.data.memory import load_split
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.synthetic import prepare_synthetic
from distvit.data.writer import StoredFormat
from distvit.errors import DataError
from tests.support.helpers import run_cli


def _members(path, suffix):
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(suffix)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same synthetic images at 64 px stored as PNG and as JPEG (quality 95)."""
    root = tmp_path_factory.mktemp("jpeg")
    common = {"train_size": 40, "test_size": 20, "image_size": 64, "samples_per_shard": 16}
    png = prepare_synthetic(root / "png", **common)
    jpeg = prepare_synthetic(root / "jpeg", **common, stored_format=StoredFormat("jpeg", 95))
    return root, png, jpeg


def test_jpeg_shards_hold_jpeg_close_to_the_png_pixels_in_far_fewer_bytes(datasets):
    root, png, jpeg = datasets
    assert jpeg.source["image_format"] == "jpeg" and jpeg.source["jpeg_quality"] == 95
    assert "image_format" not in png.source  # PNG manifests read as before
    shard = root / "jpeg" / "train-00000.tar"
    assert _members(shard, ".jpg") and not _members(shard, ".png")
    lossless = load_split(root / "png", png, "train").images.int()
    lossy = load_split(root / "jpeg", jpeg, "train").images.int()
    # quality 95 with 4:2:0 chroma, as photos are stored: the synthetic pixel noise is what it loses
    assert lossless.shape == lossy.shape and (lossless - lossy).abs().float().mean() < 12.0
    png_bytes = sum(s.num_bytes for s in png.splits["train"].shards)
    jpeg_bytes = sum(s.num_bytes for s in jpeg.splits["train"].shards)
    assert jpeg_bytes < 0.6 * png_bytes  # at 64 px (tar padding included); a quarter for photos at 224


def test_stream_memory_and_device_decoding_give_the_same_jpeg_pixels(datasets):
    root, _, jpeg = datasets
    memory = load_split(root / "jpeg", jpeg, "train")
    plan = EpochPlan(sequential_order(40), 8, 1, 0)
    for decode in ("workers", "device"):
        batches = StreamBatches(root / "jpeg", jpeg, "train", 1, torch.device("cpu"), decode=decode)
        images = torch.cat([images for _, images, _ in batches.epoch(plan)])
        assert torch.equal(images, memory.images), decode


def test_a_damaged_jpeg_body_is_one_error_naming_the_sample(datasets):
    root = datasets[0]
    good = _members(root / "jpeg" / "train-00000.tar", ".jpg")[0]
    damaged = good[:600] + bytes(len(good) - 600)  # header intact, entropy-coded data gone
    with pytest.raises(DataError, match="^s.tar sample k: image cannot be decoded"):
        decode_stored(damaged, 3, (64, 64), "s.tar sample k")


def test_an_image_folder_keeps_jpegs_already_at_the_target_size_byte_for_byte(tmp_path):
    source = tmp_path / "photos"
    rng = np.random.default_rng(0)
    kept, rotated = {}, None
    for label in ("cat", "dog"):
        (source / label).mkdir(parents=True)
        for index in range(3):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
            (source / label / f"{index}.jpg").write_bytes(buffer.getvalue())
            kept[buffer.getvalue()] = label
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: what the readers decode would differ from the upright image
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "JPEG", exif=exif)
    rotated = buffer.getvalue()
    (source / "cat" / "rotated.jpg").write_bytes(rotated)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(source / "dog" / "big.png")
    report = prepare_imagefolder(
        source, tmp_path / "out", val_fraction=0.0, image_size=24, stored_format=StoredFormat("jpeg", 90), workers=1
    )
    shards = [tmp_path / "out" / shard.name for shard in report.manifest.splits["train"].shards]
    stored = [payload for shard in shards for payload in _members(shard, ".jpg")]
    assert len(stored) == 8 and set(kept) <= set(stored) and rotated not in stored  # 6 kept, 2 encoded
    assert report.manifest.image_size == (24, 24)
    assert len(load_split(tmp_path / "out", read_manifest(tmp_path / "out"), "train")) == 8


def test_prepare_refuses_a_quality_outside_1_to_100(tmp_path):
    result = run_cli(["prepare", "synthetic", "--out", str(tmp_path / "d"), "--format", "jpeg", "--quality", "0"])
    assert result.returncode == 2 and "--quality must be between 1 and 100, got 0" in result.stderr
