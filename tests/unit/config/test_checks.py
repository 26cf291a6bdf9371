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
    from distvit.data.prepare.synthetic import prepare_synthetic

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


def test_device_decoding_with_memory_mode_is_refused(dataset_dir):
    message = error_of(None, [f"data.path={dataset_dir}", "data.decode=device", "data.mode=memory"])
    assert message == (
        "config + command-line overrides: data.decode=device applies to stream mode only: memory mode decodes "
        "each split once, on the host, when it is loaded, and would ignore it. Set data.mode=stream to decode "
        "batches on the device, or data.decode=auto."
    )
    for allowed in (["data.mode=stream"], ["data.mode=auto"]):
        load_config(None, [f"data.path={dataset_dir}", "data.decode=device", *allowed])


def test_loader_workers_have_an_upper_bound_with_its_reason(dataset_dir):
    message = error_of(None, [f"data.path={dataset_dir}", "data.num_workers=100000"])
    assert message == (
        "config + command-line overrides: invalid config value:\n  data.num_workers: Input should be less than or "
        "equal to 64 (got 100000): each worker is a process with its own interpreter, shard handles and 4 batches "
        "read ahead, and more than the cores only contend (empty: sized to the node's cores)"
    )
    assert load_config(None, [f"data.path={dataset_dir}", "data.num_workers=64"]).data.num_workers == 64


@pytest.fixture()
def small(tmp_path):
    """A 32 px synthetic dataset (20 train, 10 test) and its manifest."""
    from distvit.data.manifest import read_manifest
    from distvit.data.prepare.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "ds", train_size=20, test_size=10)
    return tmp_path / "ds", read_manifest(tmp_path / "ds")


def dataset_error(small, overrides) -> str:
    from distvit.tools.dataset_checks import check_with_dataset

    cfg = load_config(None, [f"data.path={small[0]}", *overrides])
    with pytest.raises(ConfigError) as info:
        check_with_dataset(cfg, small[1])
    return str(info.value)


def test_cpu_threads_beyond_the_usable_cores_are_refused(small, monkeypatch):
    from distvit.data import node
    from distvit.tools.dataset_checks import check_with_dataset

    monkeypatch.setattr(node, "usable_cores", lambda: 2)
    assert dataset_error(small, ["train.cpu_threads=1000"]) == (
        "train.cpu_threads=1000 is more than the 2 core(s) this process can use (2 usable here): threads beyond "
        "the cores only wait for each other, so training gets slower, not faster. Choose at most 2, or 0 for that "
        "many."
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the node share the two cores
    message = dataset_error(small, ["train.cpu_threads=2"])
    assert message.startswith("train.cpu_threads=2 is more than the 1 core(s) each of the 2 ranks on this node")
    for fine in ("train.cpu_threads=1", "train.cpu_threads=0"):
        check_with_dataset(load_config(None, [f"data.path={small[0]}", fine]), small[1])


def test_crop_padding_is_at_most_half_the_stored_side(small):
    from distvit.tools.dataset_checks import check_with_dataset

    assert dataset_error(small, ["augment.crop_padding=1000000"]) == (
        f"augment.crop_padding=1000000 is more than half the side of the stored images of {small[0]} (32 px): a random "
        "crop could keep less than half the image, or none of it, and each padded image takes (side + 2 x "
        "padding)^2 pixels. Choose at most 16 (CIFAR-style training pads 32 px images by 4)."
    )
    assert "augment.crop_padding=17 is more than half" in dataset_error(
        small, ["augment.crop=pad", "augment.crop_padding=17"]
    )
    # deit: no padded crop
    for fine in (["augment.crop_padding=16"], ["augment.preset=deit", "augment.crop_padding=1000000"]):
        check_with_dataset(load_config(None, [f"data.path={small[0]}", *fine]), small[1])


def test_crop_padding_of_varying_sizes_is_bounded_by_the_model_input(small):
    """Images of varying stored size reach the augmentation resized to the model's input size."""
    small[1].image_size = None
    message = dataset_error(small, ["surgery.img_size=64", "augment.crop_padding=33"])
    assert "the images as the reader delivers them (resized to the model input) (64 px)" in message
    assert "native" not in dataset_error(small, ["augment.crop_padding=113"])  # deit_tiny_patch16_224: 224 px


def test_memory_mode_larger_than_the_hosts_memory_is_refused(small, monkeypatch):
    from distvit.data import node

    monkeypatch.setattr(node, "available_host_memory", lambda: 50_000)
    assert dataset_error(small, ["data.mode=memory"]) == (
        f"data.mode=memory: splits 'train' and 'test' of {small[0]} decode to 92.2 kB (32 x 32 px images), more "
        "than the 50.0 kB of memory this host has available. Use data.mode=stream (decode from the shards as batches "
        "need them) or data.mode=auto (memory only where the splits fit)."
    )
