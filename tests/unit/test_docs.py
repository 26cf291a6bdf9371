"""The manual in docs/ builds with `mkdocs build --strict` (mkdocs.yml): no broken link or anchor, no page
missing from the navigation. CI installs the docs extra; elsewhere the test is skipped without MkDocs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.support.helpers import REPO


def test_the_docs_build_strict(tmp_path):
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed: pip install -e '.[docs]'"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
