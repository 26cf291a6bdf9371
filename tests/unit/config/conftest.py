"""Fixtures of the config tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def dataset_dir(tmp_path) -> Path:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    return folder
