"""distvit.data.prepare.digits and the manifest's flip_safe record (`prepare ... --no-flip`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distvit.data.manifest import read_manifest
from distvit.data.prepare.digits import CLASS_NAMES, generate, prepare_digits
from distvit.data.read.memory import load_split
from tests.support.helpers import run_cli


def _shard_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.tar"))}


def test_generate_is_seeded_balanced_and_not_blank():
    images, labels = generate(200, image_size=32, seed=5)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels, minlength=10).tolist() == [20] * 10
    again, labels_again = generate(200, image_size=32, seed=5)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(generate(200, seed=6)[0], images)
    flat = images.reshape(len(images), -1).astype(np.float32)
    assert (flat.std(axis=1) > 5).all()  # every image holds a glyph, not just a flat background
    assert (flat.max(axis=1) - np.median(flat, axis=1) > 40).all()  # light ink on a darker background
    assert np.median(flat) < 110  # the background is dark
    assert generate(20, image_size=48, seed=0)[0].shape == (20, 48, 48, 3)


def test_prepare_digits_is_deterministic_with_exact_counts_and_not_flip_safe(tmp_path):
    manifest = prepare_digits(tmp_path / "a", train_size=53, test_size=17, samples_per_shard=20, seed=3)
    assert manifest.classes == CLASS_NAMES == [str(digit) for digit in range(10)]
    assert manifest.dataset == "digits" and manifest.image_size == (32, 32) and manifest.channels == 3
    assert {name: split.num_samples for name, split in manifest.splits.items()} == {"train": 53, "test": 17}
    assert [shard.num_samples for shard in manifest.splits["train"].shards] == [20, 20, 13]
    train_counts = np.sum([shard.label_counts for shard in manifest.splits["train"].shards], axis=0)
    assert sorted(train_counts.tolist()) == [5] * 7 + [6] * 3  # balanced: every digit present
    assert manifest.source["flip_safe"] is False and manifest.flip_safe is False
    reread = read_manifest(tmp_path / "a")
    assert reread == manifest and reread.flip_safe is False
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["source"]["flip_safe"] is False

    train = load_split(tmp_path / "a", reread, "train")
    images, labels = generate(53, seed=6)  # train uses seed * 2
    assert np.array_equal(train.images.numpy(), images) and np.array_equal(train.labels.numpy(), labels)

    prepare_digits(tmp_path / "b", train_size=53, test_size=17, samples_per_shard=20, seed=3)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")  # same seed, same bytes
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    prepare_digits(tmp_path / "c", train_size=53, test_size=17, samples_per_shard=20, seed=4)
    assert _shard_bytes(tmp_path / "c")["train-00000.tar"] != _shard_bytes(tmp_path / "a")["train-00000.tar"]


def test_prepare_digits_refuses_fewer_images_than_digits(tmp_path):
    with pytest.raises(ValueError, match="test_size=9 must be at least 10"):
        prepare_digits(tmp_path / "ds", train_size=20, test_size=9)


def test_cli_prepare_digits_and_no_flip(tmp_path):
    out = tmp_path / "digits"
    result = run_cli(["prepare", "digits", "--out", str(out), "--train-size", "30", "--test-size", "10"])
    assert result.returncode == 0, result.stderr
    assert "wrote digits dataset" in result.stdout and "train 30 (1 shards), test 10 (1 shards)" in result.stdout
    assert read_manifest(out).flip_safe is False  # digits are never flip-safe, flag or not

    plain, unflipped = tmp_path / "plain", tmp_path / "unflipped"
    common = ["--train-size", "20", "--test-size", "10"]
    assert run_cli(["prepare", "synthetic", "--out", str(plain), *common]).returncode == 0
    result = run_cli(["prepare", "synthetic", "--out", str(unflipped), *common, "--no-flip"])
    assert result.returncode == 0, result.stderr
    assert "flip_safe" not in read_manifest(plain).source and read_manifest(plain).flip_safe is True
    assert read_manifest(unflipped).source["flip_safe"] is False and read_manifest(unflipped).flip_safe is False
    # --no-flip changes nothing but that record: the same shards
    assert _shard_bytes(plain) == _shard_bytes(unflipped)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train-size", "0"], "--train-size=0 must be at least 10 (one image per digit)."),
        (["--test-size", "9"], "--test-size=9 must be at least 10 (one image per digit)."),
        (["--image-size", "4"], "--image-size must be at least 8 pixels, got 4."),
        (["--quality", "0"], "--quality must be between 1 and 100, got 0."),
        (
            ["--quality", "80"],
            "--quality 80 applies to JPEG only, and the images are stored as png (lossless). Pass --format jpeg "
            "with it, or leave --quality out.",
        ),
        (
            ["--image-size", "100000"],
            "--image-size 100000 is larger than 16384 pixels, the largest image side a distvit manifest may declare "
            "(its readers allocate memory from it). Choose at most 16384.",
        ),
    ],
)
def test_cli_prepare_digits_bad_flag_is_one_error_line(tmp_path, flags, message):
    result = run_cli(["prepare", "digits", "--out", str(tmp_path / "ds"), *flags])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"distvit: error: {message}"]
    assert not (tmp_path / "ds").exists()


def test_generation_memory_estimate_covers_the_measured_peak(tmp_path):
    """prepare refuses what would not fit by this estimate (tools.prepare): it must not be below the truth."""
    import tracemalloc

    from distvit.data.prepare.digits import generation_bytes

    tracemalloc.start()
    prepare_digits(tmp_path / "ds", train_size=200, test_size=60, image_size=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= generation_bytes(200, 60, 64) <= 1.5 * peak
