"""distvit.data.manifest: a manifest whose counts do not add up is refused."""

from __future__ import annotations

import json

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.synthetic import prepare_synthetic
from distvit.errors import DataError


def test_manifest_counts_must_add_up(tmp_path):
    prepare_synthetic(tmp_path / "ds", train_size=30, test_size=20)
    path = tmp_path / "ds" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["num_samples"] = 31
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="says 31 samples but its shards hold 30"):
        read_manifest(tmp_path / "ds")
