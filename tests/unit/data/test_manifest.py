"""distvit.data.manifest: a manifest whose counts do not add up is refused."""

from __future__ import annotations

import json

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.errors import DataError


def test_manifest_counts_must_add_up(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=30, test_size=20)
    path = tmp_path / "ds" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["num_samples"] = 31
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="says 31 samples but its shards hold 30"):
        read_manifest(tmp_path / "ds")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m.update(classes=["a", "b", "a", *m["classes"][3:]]),
            r"class name\(s\) \['a'\] appear more than once",
        ),
        (lambda m: m.update(classes=["", *m["classes"][1:]]), "class names must be non-empty text"),
        (lambda m: m.update(image_size=[100000, 32]), r"image_size \[100000, 32\] is not two whole numbers from 1 to"),
        (lambda m: m.update(image_size=[1e5, 32]), r"image_size \[100000.0, 32\] is not two whole numbers"),
        (lambda m: m.update(channels=2), "channels=2; distvit datasets have 1 or 3 channels"),
        (
            lambda m: m.update(source={**m["source"], "flip_safe": "false"}),
            r"source.flip_safe is 'false' \(str\), not true or false: write true or false without quotes",
        ),
        (lambda m: m.update(source={**m["source"], "flip_safe": 0}), r"source.flip_safe is 0 \(int\), not true or"),
        (
            lambda m: m.update(source={**m["source"], "image_format": "JPEG"}),
            r"source.image_format is 'JPEG', not one of png, jpeg \(how the shards store images",
        ),
        (lambda m: m.update(source=["flip_safe", False]), "source must be a mapping of fields, got list"),
        (
            lambda m: (
                m["splits"]["test"]["shards"].append(dict(m["splits"]["train"]["shards"][0]))
                or m["splits"]["test"].update(num_samples=m["splits"]["test"]["num_samples"] + 25)
            ),
            r"shard 'train-00000.tar' is listed in splits 'train' and 'test'",
        ),
        (
            lambda m: (
                m["splits"]["train"]["shards"].append(dict(m["splits"]["train"]["shards"][0]))
                or m["splits"]["train"].update(num_samples=m["splits"]["train"]["num_samples"] + 25)
            ),
            r"shard 'train-00000.tar' is listed twice in split 'train'",
        ),
    ],
)
def test_a_manifest_prepare_never_writes_is_refused(tmp_path, change, message):
    prepare_synthetic(tmp_path / "ds", train_size=50, test_size=20, samples_per_shard=25)
    path = tmp_path / "ds" / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        read_manifest(tmp_path / "ds")


def test_typed_source_fields_read_as_written(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=20, test_size=10)
    path = tmp_path / "ds" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["source"].update(flip_safe=False, image_format="png")
    path.write_text(json.dumps(raw))
    assert read_manifest(tmp_path / "ds").flip_safe is False
