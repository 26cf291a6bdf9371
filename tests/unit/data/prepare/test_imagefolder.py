"""distvit.data.prepare.imagefolder: the image-folder importer on messy folders, bad files, layouts and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distvit.data.prepare.imagefolder import prepare_imagefolder
from distvit.data.read.memory import load_split
from distvit.errors import DataError
from tests.support.helpers import run_cli
from tests.support.images import rgb, save


@pytest.fixture()
def messy_folder(tmp_path):
    root = tmp_path / "src"
    save(root / "cat" / "a.jpg", Image.fromarray(rgb()), quality=90)
    save(root / "cat" / "b.png", Image.fromarray(np.dstack([rgb(), np.full((20, 30), 128, np.uint8)]), "RGBA"))
    save(root / "cat" / "c.webp", Image.fromarray(rgb()), lossless=True)
    save(root / "cat" / "d.bmp", Image.fromarray(rgb()))
    save(root / "cat" / "nested" / "e.png", Image.fromarray(rgb(20, 20)).convert("L"))
    save(root / "cat" / "f.jpg", Image.fromarray(rgb()).convert("CMYK"), quality=90)
    save(root / "dog" / "g.png", Image.fromarray(np.full((25, 25), 40000, dtype=np.uint16)))
    save(root / "dog" / "h.png", Image.fromarray(rgb()).convert("P"))
    save(root / "dog" / "i.png", Image.fromarray(rgb(30, 20)))
    save(root / "dog" / "j.gif", Image.fromarray(rgb()).convert("P"))
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    full = (root / "cat" / "a.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def test_messy_folder_imports_with_skips_reported(messy_folder, tmp_path):
    report = prepare_imagefolder(messy_folder, tmp_path / "out", val_fraction=0.0, image_size=16)
    manifest = report.manifest
    assert manifest.classes == ["cat", "dog"] and manifest.image_size == (16, 16)
    assert manifest.splits["train"].num_samples == 10 and list(manifest.splits) == ["train"]
    assert sorted(p.name for p, _ in report.skipped) == ["empty.jpg", "notes.txt", "truncated.jpg"]
    assert dict((p.name, r) for p, r in report.skipped)["empty.jpg"] == "empty file"
    assert [p.name for p in report.ignored] == [".DS_Store"]
    assert manifest.source["skipped_files"] == 3
    data = load_split(tmp_path / "out", manifest, "train")
    assert data.images.shape == (10, 16, 16, 3)
    assert sorted(data.labels.tolist()) == [0] * 6 + [1] * 4
    sixteen_bit = data.images[(data.images == 156).all(dim=3).all(dim=2).all(dim=1)]  # 40000 / 257 = 155.6
    assert len(sixteen_bit) == 1


def test_strict_makes_bad_files_an_error(messy_folder, tmp_path):
    with pytest.raises(DataError, match=r"3 file\(s\) in .* are not usable images \(--strict\)"):
        prepare_imagefolder(messy_folder, tmp_path / "out", strict=True, image_size=16)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_sizes_kept_when_not_resizing(messy_folder, tmp_path):
    manifest = prepare_imagefolder(messy_folder, tmp_path / "out", val_fraction=0.0).manifest
    assert manifest.image_size is None
    with pytest.raises(DataError, match="different sizes.*--image-size"):
        load_split(tmp_path / "out", manifest, "train")


def test_lossless_pixels_round_trip_and_bytes_are_reproducible(tmp_path):
    root = tmp_path / "src"
    originals = {}
    for cls in ("a", "b", "c"):
        for i in range(7):
            array = rgb(12, 12)
            save(root / cls / f"{i}.png", Image.fromarray(array))
            originals[array.tobytes()] = "abc".index(cls)
    first = prepare_imagefolder(root, tmp_path / "one", val_fraction=0.3, seed=1, workers=1).manifest
    second = prepare_imagefolder(root, tmp_path / "two", val_fraction=0.3, seed=1, workers=2).manifest
    # 1 and 2 decoding processes: the same manifest, so the same shard bytes (sha256 included)
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()
    assert first == second
    assert {k: v.num_samples for k, v in first.splits.items()} == {"train": 15, "val": 6}  # 2 of 7 per class held out
    seen = {}
    for split in ("train", "val"):
        data = load_split(tmp_path / "one", first, split)
        for image, label in zip(data.images, data.labels):
            seen[image.numpy().tobytes()] = int(label)
    assert seen == originals
    labels = load_split(tmp_path / "one", first, "train").labels.tolist()
    assert labels != sorted(labels)  # written in a seeded random order, not class by class


def test_train_val_folders_are_used_as_given(tmp_path):
    root = tmp_path / "src"
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("x", "y"):
            for i in range(count):
                save(root / split / cls / f"{i}.png", Image.fromarray(rgb(8, 8)))
    manifest = prepare_imagefolder(root, tmp_path / "out", val_fraction=0.5).manifest
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 8, "val": 4}
    assert manifest.source["split_folders"] is True
    save(root / "val" / "z" / "0.png", Image.fromarray(rgb(8, 8)))
    with pytest.raises(DataError, match="classes that train/ lacks: z"):
        prepare_imagefolder(root, tmp_path / "out2")


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "has no class folders"),
        ({"only/1.png": True}, "has a single class"),
        ({"a/1.png": True, "b/.hidden": False}, r"class folder .*b holds no files"),
        ({"a/1.png": True, "b/bad.png": False}, r"class\(es\) b have no decodable image"),
    ],
)
def test_layout_errors(tmp_path, layout, message):
    root = tmp_path / "src"
    root.mkdir()
    for name, is_image in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_image:
            Image.fromarray(rgb(8, 8)).save(path)
        else:
            path.write_bytes(b"junk")
    with pytest.raises(DataError, match=message):
        prepare_imagefolder(root, tmp_path / "out", val_fraction=0.0)


def test_cli_prepare_imagefolder(messy_folder, tmp_path):
    result = run_cli(
        [
            "prepare",
            "imagefolder",
            "--source",
            str(messy_folder),
            "--out",
            str(tmp_path / "out"),
            "--image-size",
            "16",
            "--val-fraction",
            "0.25",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "notes.txt" in result.stderr
    assert (
        "3 file(s) skipped as not decodable, 0 symbolic link(s) leading out of the source skipped, "
        "1 hidden file(s) ignored" in result.stdout
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sum(split["num_samples"] for split in manifest["splits"].values()) == 10
    result = run_cli(["prepare", "imagefolder", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_links_out_of_the_source_are_skipped_and_reported_or_refused(tmp_path):
    """A file symlinked from elsewhere and a class folder linked to another tree are not imported (and
    --strict refuses them); links that stay inside the source are followed as before."""
    root, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    for name in ("a", "b"):
        save(root / "cat" / f"{name}.png", Image.fromarray(rgb()))
        save(root / "dog" / f"{name}.png", Image.fromarray(rgb()))
    save(elsewhere / "secret.png", Image.fromarray(rgb()))
    save(elsewhere / "private" / "x.png", Image.fromarray(rgb()))
    (root / "cat" / "linked.png").symlink_to(elsewhere / "secret.png")
    (root / "dog" / "inside.png").symlink_to(root / "cat" / "a.png")  # stays in the source: imported
    (root / "etc").symlink_to(elsewhere / "private", target_is_directory=True)
    report = prepare_imagefolder(root, tmp_path / "out", val_fraction=0.0)
    assert report.manifest.classes == ["cat", "dog"] and report.manifest.splits["train"].num_samples == 5
    assert sorted((p.name, r) for p, r in report.skipped) == [
        ("etc", "a symbolic link leading out of the source folder (not imported)"),
        ("linked.png", "a symbolic link leading out of the source folder (not imported)"),
    ]
    with pytest.raises(DataError, match=r"^2 symbolic link\(s\) in .* lead out of it \(--strict\)"):
        prepare_imagefolder(root, tmp_path / "strict", val_fraction=0.0, strict=True)
    assert not (tmp_path / "strict").exists()  # refused before anything was written


def test_control_characters_in_names_are_escaped_never_dropped(tmp_path):
    root = tmp_path / "src"
    save(root / "cat" / "a.png", Image.fromarray(rgb()))
    save(root / "dog" / "b.png", Image.fromarray(rgb()))
    (root / "cat" / "forged\ndistvit: all good.png").write_bytes(b"not an image")
    result = run_cli(["prepare", "imagefolder", "--source", str(root), "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    assert "forged\\ndistvit: all good.png" in result.stderr and "\ndistvit: all good" not in result.stderr
    (root / "bad\nclass").mkdir()
    save(root / "bad\nclass" / "c.png", Image.fromarray(rgb()))
    with pytest.raises(DataError, match=r"class folder .*bad\\nclass has a control character in its name: rename it"):
        prepare_imagefolder(root, tmp_path / "out2", val_fraction=0.0)
