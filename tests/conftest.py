"""Shared fixtures: small synthetic datasets, a 'pretrained' weights file, the demo run, a Slurm cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from distvit.data.prepare.synthetic import prepare_synthetic


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


@pytest.fixture(scope="session")
def demo_run(demo_dataset, tmp_path_factory):
    """The README's main job (configs/demo.yaml on 2 gloo ranks, W&B offline), run once and shared:
    (run_dir, overrides, the launch result)."""
    from tests.support.helpers import accelerate_launch

    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    overrides = [f"data.path={demo_dataset}", f"run.dir={run_dir}", "tracking.mode=offline"]
    result = accelerate_launch(2, ["--config", "configs/demo.yaml", *overrides])
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return run_dir, overrides, result


@pytest.fixture(scope="session")
def slurm_cluster():
    """A local Slurm cluster (nodes n1, n2 on this host) for the tests marked `slurm`. Skipped where Slurm
    cannot run (not installed, not root), except under CI=true, where that is a failure."""
    import os

    from tests.support.slurm_cluster import LocalCluster, slurm_available

    reason = slurm_available()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but Slurm cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = LocalCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 'pretrained' file saved from a randomly initialised model (no downloads)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("w") / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), path)
    return path
