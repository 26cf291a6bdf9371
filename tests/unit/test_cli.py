"""The `distvit` command: user errors are one clear message and exit status 2, never a traceback."""

from __future__ import annotations

import pytest
import yaml

from distvit.config import load_config
from tests.support.helpers import REPO, run_cli


def test_config_command_prints_resolved_config(small_dataset, tmp_path):
    result = run_cli(
        [
            "config",
            "--config",
            "configs/demo.yaml",
            f"data.path={small_dataset}",
            f"run.dir={tmp_path}/r",
            "optim.lr=3e-4",
        ]
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["optim"]["lr"] == 3e-4 and printed["data"]["path"] == str(small_dataset)
    expected = load_config(
        REPO / "configs/demo.yaml", [f"data.path={small_dataset}", f"run.dir={tmp_path}/r", "optim.lr=3e-4"]
    )
    assert printed == expected.to_dict()


def test_train_with_bad_key_is_clear_error(small_dataset):
    result = run_cli(["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", "optim.lrr=1e-3"])
    assert result.returncode == 2
    assert "distvit: error:" in result.stderr and "did you mean optim.lr?" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_moved_key_is_one_error_naming_its_new_place(small_dataset, capsys):
    result = run_cli(["train", "--config", "configs/demo.yaml", f"data.path={small_dataset}", "data.mix_prob=0.5"])
    assert result.returncode == 2 and result.stderr == (
        "distvit: error: command line: `data.mix_prob` moved to `mix.prob`; write it there (same value).\n"
    )
    from distvit.cli import main

    config = ["config", "--config", "configs/demo.yaml", f"data.path={small_dataset}"]
    assert main([*config, "--get", "data.augment"]) == 2
    assert capsys.readouterr().err == (
        "distvit: error: --get data.augment: `data.augment` moved to `augment.preset`; ask for that.\n"
    )
    assert main([*config, "--get", "augment.preset"]) == 0 and capsys.readouterr().out == "crop_flip\n"


def test_train_with_missing_data_is_clear_error(tmp_path):
    result = run_cli(["train", "--config", "configs/demo.yaml", f"data.path={tmp_path}/absent"])
    assert result.returncode == 2
    assert f"data.path='{tmp_path}/absent' does not exist" in result.stderr
    assert "distvit prepare synthetic --out" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_split_and_existing_run_dir_are_clear_errors(small_dataset, tmp_path):
    result = run_cli(["config", "--config", "configs/demo.yaml", f"data.path={small_dataset}", "data.eval_split=val"])
    assert (
        result.returncode == 2
        and "data.eval_split='val'" in result.stderr
        and "Available splits: train, test" in result.stderr
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    args = ["config", "--config", "configs/demo.yaml", f"data.path={small_dataset}", f"run.dir={tmp_path}/run"]
    result = run_cli(args + ["run.overwrite=true"])  # a config.yaml alone is not a distvit run: never replaced
    assert result.returncode == 2 and "is not empty (config.yaml) and holds no distvit run" in result.stderr
    (tmp_path / "run" / "distvit-run.json").write_text('{"distvit_run": 1}')
    result = run_cli(args + ["run.overwrite=false"])
    assert result.returncode == 2 and "already holds a run" in result.stderr and "run.overwrite=true" in result.stderr
    assert run_cli(args + ["run.overwrite=true"]).returncode == 0


def test_prepare_synthetic_writes_dataset_and_validates_flags(tmp_path):
    result = run_cli(
        [
            "prepare",
            "synthetic",
            "--out",
            str(tmp_path / "ds"),
            "--train-size",
            "120",
            "--test-size",
            "30",
            "--samples-per-shard",
            "50",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "train 120 (3 shards), test 30 (1 shards)" in result.stdout
    assert (tmp_path / "ds" / "manifest.json").is_file()
    for flags, message in (
        (["--out", str(tmp_path / "x"), "--num-classes", "11"], "--num-classes must be between 2 and 10"),
        (["--out", str(tmp_path / "x"), "--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
        (["--out", str(tmp_path / "ds" / "manifest.json")], "is a file; pass a folder"),
        (
            ["--out", str(tmp_path / "ds" / "manifest.json" / "sub")],
            "cannot read the source or write the dataset to --out",
        ),
    ):
        result = run_cli(["prepare", "synthetic", *flags, "--train-size", "20", "--test-size", "10"])
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_preflight_names_a_corrupted_shard_before_training(tmp_path):
    from distvit.data.prepare.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path / "ds", train_size=100, test_size=20, samples_per_shard=50)
    shard = tmp_path / "ds" / "train-00001.tar"
    payload = bytearray(shard.read_bytes())
    payload[3000] ^= 1
    shard.write_bytes(bytes(payload))
    args = ["train", "--config", "configs/demo.yaml", f"data.path={tmp_path}/ds", f"run.dir={tmp_path}/run"]
    result = run_cli(args)
    assert result.returncode == 2
    assert f"{shard}: sha256 differs from the manifest" in result.stderr and "data.bad_shards=skip" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started
    result = run_cli(["config", *args[1:], "data.verify=size"])
    assert result.returncode == 0  # same size: only the sha256 check sees it


@pytest.mark.parametrize("command", [["evaluate", "RUN"], ["bench", "data", "--data", "DATA"]])
def test_an_output_file_in_a_missing_folder_or_onto_a_folder_is_refused_first(tmp_path, capsys, command):
    """Checked before the command's work (evaluate used to fail only after the whole evaluation)."""
    from distvit.cli import main

    for target, reason in (
        (tmp_path / "missing" / "r.json", "does not exist; create it first"),
        (tmp_path, "is a folder"),
    ):
        args = [str(tmp_path / "nothing-here") if a in ("RUN", "DATA") else a for a in command]
        assert main([*args, "--json", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"distvit: error: --json {target}: ") and reason in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
