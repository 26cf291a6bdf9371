"""Config loading: YAML + dotted overrides, and the errors a user sees for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distvit.config import Config, all_keys, load_config
from distvit.errors import ConfigError
from tests.support.helpers import REPO


def write_config(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def error_of(path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_every_shipped_config_loads(dataset_dir):
    for config_file in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(config_file, [f"data.path={dataset_dir}"])
        assert isinstance(cfg, Config)


def test_yaml_then_overrides_with_types(tmp_path, dataset_dir):
    path = write_config(tmp_path, {"data": {"path": str(dataset_dir)}, "optim": {"lr": 0.1}, "train": {"epochs": 3}})
    cfg = load_config(
        path, ["optim.lr=3e-4", "train.mixed_precision=bf16", "model.pretrained=true", "surgery.img_size=64"]
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.model.pretrained is True
    assert cfg.surgery.img_size == 64
    assert cfg.run.dir == str(Path("runs") / "cfg")  # default: runs/<config stem>
    assert cfg.tracking.run_name == "cfg"


def test_resolved_config_round_trips(tmp_path, dataset_dir):
    cfg = load_config(None, [f"data.path={dataset_dir}", "optim.betas=[0.8,0.99]", "run.dir=/tmp/x"])
    again = load_config(write_config(tmp_path, yaml.safe_load(cfg.to_yaml())), [])
    assert again == cfg


def test_unknown_key_suggests_nearest(dataset_dir):
    message = error_of(None, [f"data.path={dataset_dir}", "optim.lrr=1e-3"])
    assert "unknown config key 'optim.lrr'" in message and "did you mean optim.lr?" in message
    assert "Valid keys in 'optim'" in message


def test_key_in_wrong_section_suggests_right_section(dataset_dir):
    message = error_of(None, [f"data.path={dataset_dir}", "optim.epochs=3"])
    assert "did you mean train.epochs?" in message


MOVED = [
    ("data.augment", "augment.preset", "deit"),
    ("data.crop_padding", "augment.crop_padding", "2"),
    ("data.mixup_alpha", "mix.mixup_alpha", "0.8"),
    ("data.cutmix_alpha", "mix.cutmix_alpha", "1.0"),
    ("data.mix_prob", "mix.prob", "0.5"),
    ("data.mix_switch_prob", "mix.switch_prob", "0.5"),
    ("train.eval_every", "eval.every", "2"),
    ("train.eval_batch_size", "eval.batch_size", "64"),
]


@pytest.mark.parametrize("old, new, value", MOVED, ids=[old for old, _, _ in MOVED])
def test_a_moved_key_is_refused_naming_its_new_place(tmp_path, dataset_dir, old, new, value):
    """No silent alias: a key that moved to its reader's section is one error, in a file and on the command
    line alike, naming where it is now; written there, the same value is taken."""
    section, key = old.split(".")
    assert error_of(None, [f"data.path={dataset_dir}", f"{old}={value}"]) == (
        f"command line: `{old}` moved to `{new}`; write it there (same value)."
    )
    path = write_config(tmp_path, {"data": {"path": str(dataset_dir)}, section: {key: yaml.safe_load(value)}})
    assert error_of(path, []) == f"{path}: `{old}` moved to `{new}`; write it there (same value)."
    cfg = load_config(None, [f"data.path={dataset_dir}", f"{new}={value}"])
    new_section, new_key = new.split(".")
    assert str(getattr(getattr(cfg, new_section), new_key)) == value
    assert old not in all_keys() and new in all_keys()


def test_every_moved_key_is_tested():
    from distvit.config import MOVED_KEYS

    assert MOVED_KEYS == {old: new for old, new, _ in MOVED}


def test_unknown_section_in_file_names_file(tmp_path, dataset_dir):
    path = write_config(tmp_path, {"data": {"path": str(dataset_dir)}, "trian": {"epochs": 2}})
    message = error_of(path, [])
    assert str(path) in message and "unknown config section 'trian'" in message and "did you mean train?" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
        ("train.batch_size=0", "train.batch_size: Input should be greater than 0"),
        ("train.epochs=abc", "train.epochs: Input should be a valid integer"),
        ("train.epochs=2.5", "train.epochs: Input should be a valid integer"),
        ("train.mixed_precision=fp32", "train.mixed_precision: Input should be 'auto', 'no', 'bf16' or 'fp16'"),
        ("optim.name=lamb", "optim.name: Input should be 'adamw' or 'sgd'"),
        ("surgery.drop_path=1.5", "surgery.drop_path: Input should be less than 1"),
        ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
        ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
        ("tracking.backend=wandbb", "tracking.backend: Input should be 'wandb' or 'none'"),
    ],
)
def test_bad_values_name_key_and_allowed(dataset_dir, override, expected):
    message = error_of(None, [f"data.path={dataset_dir}", override])
    assert expected in message
    assert repr(yaml.safe_load(override.split("=", 1)[1])) in message  # shows what was given


def test_malformed_override_and_yaml(tmp_path, dataset_dir):
    assert "is not of the form key=value" in error_of(None, ["optim.lr"])
    assert "is not a section.key name" in error_of(None, ["lr=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    assert "is not valid YAML at line" in error_of(bad, [])
    assert "does not exist" in error_of(tmp_path / "missing.yaml", [])


def test_all_keys_lists_documented_interface():
    keys = set(all_keys())
    assert {"data.path", "run.dir", "train.epochs", "train.seed", "model.name", "model.pretrained", "optim.lr"} <= keys


def test_yaml_1_1_booleans_stay_strings(tmp_path, dataset_dir):
    """`mixed_precision: no` must mean the string 'no', not False (YAML 1.1 reads no/off/yes/on as booleans)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  path: {dataset_dir}\ntrain:\n  mixed_precision: no\noptim:\n  lr: 3e-4\n")
    cfg = load_config(path, [])
    assert cfg.train.mixed_precision == "no" and cfg.optim.lr == pytest.approx(3e-4)
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(path, ["model.pretrained=false"]).model.pretrained is False


def test_yaml_1_2_numbers_and_text_keys(dataset_dir):
    cfg = load_config(
        None,
        [
            f"data.path={dataset_dir}",
            "train.seed=010",
            "run.dir=2024-01-01",
            "tracking.project=123",
            "tracking.entity=",
        ],
    )
    assert cfg.train.seed == 10  # decimal, not octal
    assert cfg.run.dir == "2024-01-01" and cfg.tracking.project == "123"  # text keys keep the typed text
    assert cfg.tracking.entity is None


def test_unreadable_or_odd_config_files(tmp_path, dataset_dir):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\x82 not text")
    assert "is not a UTF-8 text file" in error_of(binary, [])
    numeric = tmp_path / "numeric.yaml"
    numeric.write_text("1: 2\n")
    assert "config section names must be text, got 1" in error_of(numeric, [])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "must hold a mapping of sections" in error_of(listing, [])


def test_home_directory_is_expanded(dataset_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, [f"data.path={dataset_dir}", "run.dir=~/runs/x"]).run.dir == str(tmp_path / "runs/x")


@pytest.mark.parametrize("value", ["1e23", "2.0", "true", "false", "3.5"])
def test_integer_keys_take_only_integers(dataset_dir, value):
    """pydantic would turn 1e23 into a 24-digit epoch count and true into 1: refused, naming the key."""
    error = error_of(None, [f"data.path={dataset_dir}", f"train.epochs={value}"])
    assert "invalid config value" in error and "train.epochs: Input should be a valid integer" in error
    assert load_config(None, [f"data.path={dataset_dir}", "train.epochs=3"]).train.epochs == 3


def test_a_repeated_key_in_a_yaml_file_is_an_error(tmp_path, dataset_dir):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {dataset_dir}\ntrain:\n  epochs: 2\n  seed: 1\n  epochs: 20\n")
    assert error_of(config, []) == (
        f"config file {config} is not valid YAML at line 6, column 3: duplicate key 'epochs' (first at line 4)."
    )
    config.write_text(f"data:\n  path: {dataset_dir}\ntrain:\n  epochs: 2\ntrain:\n  seed: 1\n")
    assert "duplicate key 'train' (first at line 3)" in error_of(config, [])
    config.write_text(f"data:\n  path: {dataset_dir}\ntrain:\n  epochs: 2\noptim:\n  epochs: 3\n")  # other sections
    assert "unknown config key 'optim.epochs'" in error_of(config, [])


def test_yaml_merge_keys_still_let_a_written_key_override_a_merged_one():
    from distvit.config.loading import parse_yaml

    parsed = parse_yaml("base: &b\n  epochs: 2\n  seed: 1\ntrain:\n  <<: *b\n  epochs: 5\n")
    assert parsed["train"] == {"epochs": 5, "seed": 1}
