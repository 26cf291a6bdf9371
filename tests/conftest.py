"""Shared fixtures: small synthetic datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from distvit.data.synthetic import prepare_synthetic


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """200 train / 101 test images (101: not a multiple of any batch or world size used in tests)."""
    out = tmp_path_factory.mktemp("data") / "synthetic-small"
    prepare_synthetic(out, train_size=200, test_size=101, samples_per_shard=64)
    return out


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """The dataset of the README's demo command."""
    out = tmp_path_factory.mktemp("data") / "synthetic-demo"
    prepare_synthetic(out, train_size=5000, test_size=1000)
    return out
