"""JPEG shards: `prepare --format jpeg`, original JPEG bytes kept by the image-folder import, and the
readers' libjpeg-turbo decoding (in workers, or in batches on the training device)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from distvit.data.images import decode_stored
from distvit.data.manifest import read_manifest
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.prepare.imagefolder import prepare_imagefolder
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.prepare.writer import StoredFormat
from distvit.data.read.loader import StreamBatches
from distvit.data.read.memory import load_split
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


# JPEGs whose entropy-coded data ends before their frame does: libjpeg (under TorchCodec, torchvision and
# Pillow) only warns on stderr and fills the missing blocks grey, so without a check they trained silently.


def _jpeg(array, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _taller(payload: bytes, rows: int) -> bytes:
    """The JPEG with its frame header (SOF) patched to claim `rows` rows; the data stays as it was."""
    position = 2
    while payload[position + 1] not in (0xC0, 0xC1, 0xC2):
        position += 2 + int.from_bytes(payload[position + 2 : position + 4], "big")
    return payload[: position + 5] + rows.to_bytes(2, "big") + payload[position + 7 :]


def _cut_short(payload: bytes) -> bytes:
    """Half the entropy-coded data, then the end-of-image marker and zeros: the same length (a tar member
    can be replaced in place) and a well-formed ending, but data for only part of the image."""
    scan = payload.index(b"\xff\xda")
    kept = payload[: scan + (len(payload) - scan) // 2] + b"\xff\xd9"
    return kept.ljust(len(payload), b"\0")


def _photo(height=64, width=64):
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("damage", ["header claims twice the rows", "data cut short"])
def test_a_jpeg_whose_data_ends_early_is_a_damaged_sample_on_every_decode_path(damage):
    from distvit.data.images import IncompleteJpeg, checked_jpeg, decode_jpeg

    good = _jpeg(_photo(), quality=95)
    bad, size = (_taller(good, 128), (128, 64)) if damage.startswith("header") else (_cut_short(good), (64, 64))
    expected = r"^s.tar sample k: image cannot be decoded \(IncompleteJpeg: its data ends before the image does: "
    with pytest.raises(DataError, match=expected):
        decode_stored(bad, 3, size, "s.tar sample k")  # stream workers and the memory loader
    with pytest.raises(DataError, match=expected):
        decode_stored(bad, 1, size, "s.tar sample k")  # grey datasets: Pillow's decoder
    tensor = torch.from_numpy(np.frombuffer(checked_jpeg(bad, size, "s.tar sample k"), np.uint8).copy())
    with pytest.raises(IncompleteJpeg):  # device decoding: a batch, then (in the loader) one by one
        decode_jpeg([torch.from_numpy(np.frombuffer(good, np.uint8).copy()), tensor])
    with pytest.raises(IncompleteJpeg):
        decode_jpeg(tensor)


def test_a_jpeg_cut_without_its_end_marker_is_refused_before_device_decoding():
    from distvit.data.images import checked_jpeg

    good = _jpeg(_photo(), quality=95)
    with pytest.raises(
        DataError, match=r"^s.tar sample k: .*it ends without its end-of-image marker: the file was cut"
    ):
        checked_jpeg(good[: len(good) * 2 // 3], (64, 64), "s.tar sample k")
    assert checked_jpeg(good + b"trailing bytes after the end marker", (64, 64), "s") is not None


@pytest.mark.parametrize(
    "options",
    [{"quality": 95}, {"quality": 75, "subsampling": 0}, {"quality": 90, "progressive": True}, {"optimize": True}],
)
def test_complete_jpegs_with_mid_grey_bottom_rows_decode_as_pillow_decodes_them(options):
    """What a damaged JPEG's missing blocks decode to (mid-grey, 128) is also legitimate content: such
    images take the exact check and pass it, with Pillow's pixels."""
    from distvit.data.images import ends_early

    half_grey = np.full((40, 56, 3), 128, np.uint8)
    half_grey[:20] = _photo(20, 56)
    letterboxed = np.full((48, 48, 3), 128, np.uint8)
    letterboxed[:, :24] = _photo(48, 24)
    for array in (half_grey, letterboxed, np.full((16, 16, 3), 128, np.uint8)):
        payload = _jpeg(array, **options)
        decoded = decode_stored(payload, 3, array.shape[:2], "s")
        assert decoded[-1, -1].tolist() == [128, 128, 128] and not ends_early(payload)
        with Image.open(io.BytesIO(payload)) as image:
            assert np.array_equal(decoded, np.asarray(image.convert("RGB")))


def _cut_short_in_place(dataset, split: str, index: int) -> str:
    """Replace sample `index`'s JPEG by `_cut_short` of it in its shard (same size: the tar stays valid)."""
    from distvit.data.read.loader import index_shards

    paths, locations = index_shards(dataset, read_manifest(dataset), split)
    sample = locations[index]
    with open(paths[sample.shard], "r+b") as shard:
        shard.seek(sample.image_offset)
        payload = shard.read(sample.image_size)
        shard.seek(sample.image_offset)
        shard.write(_cut_short(payload))
    return sample.key


def test_a_jpeg_shard_sample_cut_short_stops_memory_and_stream_reading_naming_it(tmp_path):
    dataset = tmp_path / "jpeg"
    common = {"train_size": 24, "test_size": 10, "image_size": 64, "samples_per_shard": 8}
    manifest = prepare_synthetic(dataset, **common, stored_format=StoredFormat("jpeg", 95))
    key = _cut_short_in_place(dataset, "train", 11)  # shard 1, its fourth sample
    expected = rf"^{dataset / 'train-00001.tar'} sample {key}: image cannot be decoded \(IncompleteJpeg"
    with pytest.raises(DataError, match=expected):
        load_split(dataset, manifest, "train")
    plan = EpochPlan(sequential_order(24), 8, 1, 0)
    for decode in ("workers", "device"):
        batches = StreamBatches(dataset, manifest, "train", 0, torch.device("cpu"), decode=decode)
        with pytest.raises(DataError, match=expected):
            list(batches.epoch(plan))
