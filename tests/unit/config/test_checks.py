"""distvit.config.checks: rules that span several keys or the file system, and their messages."""

from __future__ import annotations

import pytest

from distvit.config import load_config
from distvit.errors import ConfigError
from tests.support.helpers import REPO


def error_of(path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_config_checks_for_the_new_keys(tmp_path):
    data = tmp_path / "ds"
    from distvit.data.synthetic import prepare_synthetic

    prepare_synthetic(data, train_size=20, test_size=10, samples_per_shard=64)
    base = [f"data.path={data}"]
    cases = {
        "optim.schedule=step": "optim.schedule=step needs optim.step_epochs",
        "optim.step_epochs=[2,1]": "must be in increasing order",
        "train.grad_accum_steps=3": "not divisible by train.grad_accum_steps=3",
        "distill.type=soft": "distill.type=soft needs distill.teacher",
        "distill.teacher=deit_tiny_patch16_22": "did you mean deit_tiny_patch16_224",
        "ema.decay=1.5": "ema.decay",
    }
    for override, message in cases.items():
        extra = ["distill.type=soft"] if override.startswith("distill.teacher") else []
        with pytest.raises(ConfigError, match=None) as err:
            load_config(REPO / "configs/demo.yaml", [*base, override, *extra])
        assert message in str(err.value), (override, str(err.value))


def test_img_size_must_be_divisible_by_patch(dataset_dir):
    message = error_of(None, [f"data.path={dataset_dir}", "surgery.img_size=30", "surgery.patch_size=4"])
    assert "surgery.img_size=30 is not divisible by surgery.patch_size=4" in message


def test_missing_data_path_explains_how_to_create_one(tmp_path):
    assert "data.path is required" in error_of(None, [])
    message = error_of(None, [f"data.path={tmp_path / 'nope'}"])
    assert "does not exist" in message and "distvit prepare synthetic --out" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no manifest.json" in error_of(None, [f"data.path={empty}"])


def test_pretrained_path_must_exist(dataset_dir, tmp_path):
    message = error_of(None, [f"data.path={dataset_dir}", f"model.pretrained={tmp_path / 'w.pth'}"])
    assert "model.pretrained=" in message and "weights file" in message


def test_a_cache_needs_a_remote_and_a_limit(dataset_dir):
    message = error_of(None, [f"data.path={dataset_dir}", "data.cache_dir=/tmp/c", "data.cache_limit=1000"])
    assert "data.cache_dir is set but data.remote is not" in message
    remote = ["data.remote=https://host/{name}", "data.cache_dir=/tmp/c"]
    assert "data.cache_dir needs data.cache_limit" in error_of(None, [f"data.path={dataset_dir}", *remote])
