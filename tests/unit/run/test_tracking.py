"""distvit.run.tracking: the W&B run id kept across resumes, the W&B mode, metrics.jsonl lines."""

from __future__ import annotations

import json
import re

import pytest
from accelerate import Accelerator

from distvit.config import load_config
from distvit.run.tracking import RunTracker, read_metrics, resolve_run_id, wandb_mode

RUN_ID = re.compile(r"[0-9a-f]{8}")


def tracker_file(run_dir):
    return json.loads((run_dir / "tracker.json").read_text())


def test_run_id_from_the_checkpoint_then_tracker_json_then_new(tmp_path):
    new = resolve_run_id(tmp_path, None)
    assert RUN_ID.fullmatch(new)
    assert tracker_file(tmp_path) == {"wandb_run_id": new}  # written for the next job of this run
    assert resolve_run_id(tmp_path, None) == new
    assert resolve_run_id(tmp_path, {}) == resolve_run_id(tmp_path, {"wandb_run_id": None}) == new
    assert resolve_run_id(tmp_path, {"wandb_run_id": "ckpt0001"}) == "ckpt0001"  # the checkpoint's id wins
    assert tracker_file(tmp_path) == {"wandb_run_id": new}  # and is not written over tracker.json
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_run_id(other, {"wandb_run_id": "ckpt0001"}) == "ckpt0001"
    assert not (other / "tracker.json").exists()
    assert resolve_run_id(other, None) != new  # another run directory, another run


@pytest.mark.parametrize("damaged", ["{not json", "", "[1, 2]", '{"run": "abcd1234"}'])
def test_damaged_tracker_json_gets_a_new_id(tmp_path, damaged):
    (tmp_path / "tracker.json").write_text(damaged)
    run_id = resolve_run_id(tmp_path, None)
    assert RUN_ID.fullmatch(run_id)
    assert tracker_file(tmp_path) == {"wandb_run_id": run_id}
    assert [p.name for p in tmp_path.iterdir()] == ["tracker.json"]  # no .tmp left


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No W&B settings in the environment; HOME (for ~/.netrc) is an empty folder."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_wandb_mode_explicit_environment_or_key(clean_env, monkeypatch):
    assert wandb_mode("online") == ("online", "tracking.mode=online")
    assert wandb_mode("offline") == ("offline", "tracking.mode=offline")
    assert wandb_mode("auto") == ("offline", "no W&B API key found")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode("auto") == ("online", "WANDB_API_KEY is set")
    assert wandb_mode("offline") == ("offline", "tracking.mode=offline")  # an explicit mode wins over a key
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == ("disabled", "WANDB_MODE is set")  # WANDB_MODE wins over the key
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == ("offline", "WANDB_MODE is set")
    assert wandb_mode("online") == ("online", "tracking.mode=online")
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # not one of the modes distvit passes on: ignored
    assert wandb_mode("auto") == ("online", "WANDB_API_KEY is set")


def test_wandb_mode_from_a_netrc_login(clean_env):
    netrc = clean_env / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_mode("auto") == ("online", "an api.wandb.ai login is in ~/.netrc")
    netrc.write_text("machine example.com login user password secret\n")
    assert wandb_mode("auto") == ("offline", "no W&B API key found")


def test_metrics_lines_are_strict_json_with_nan_and_inf_as_null(tmp_path):
    cfg = load_config(None, ["tracking.backend=none", f"run.dir={tmp_path}"], check_data=False)
    tracker = RunTracker(cfg.tracking, accelerator=Accelerator(cpu=True), run_dir=tmp_path, class_names=["a", "b"])
    tracker.start({**cfg.to_dict(), "world_size": 1})
    assert not tracker.use_wandb and tracker.run_id is None and not (tmp_path / "tracker.json").exists()
    tracker.log({"split": "train", "epoch": 1, "step": 1, "loss": float("nan"), "lr": 1e-3, "grad_norm": float("inf")})
    tracker.log(
        {
            "split": "test",
            "epoch": 1,
            "step": 2,
            "loss": float("-inf"),
            "accuracy": 0.5,
            "per_class_accuracy": [1.0, None],
        }
    )
    tracker.finish()
    expected = [
        {"split": "train", "epoch": 1, "step": 1, "loss": None, "lr": 1e-3, "grad_norm": None},
        {"split": "test", "epoch": 1, "step": 2, "loss": None, "accuracy": 0.5, "per_class_accuracy": [1.0, None]},
    ]

    def strict(line):
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written in {line}"))

    assert [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == expected
    assert read_metrics(tmp_path) == expected
    resumed = RunTracker(cfg.tracking, accelerator=Accelerator(cpu=True), run_dir=tmp_path)  # a resumed run appends
    resumed.log({"split": "train", "epoch": 2, "step": 3, "loss": 0.5})
    resumed.finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_full_disk_while_logging_is_one_clear_error(tmp_path):
    from accelerate import Accelerator

    from distvit.config import Config
    from distvit.errors import DistvitError
    from distvit.run.tracking import RunTracker

    tracker = RunTracker(Config().tracking, accelerator=Accelerator(cpu=True), run_dir=tmp_path)

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

    tracker._handle = FullDisk()
    with pytest.raises(DistvitError) as err:
        tracker.log({"split": "train", "step": 3, "loss": 1.0})
    assert str(err.value).startswith(
        f"writing {tmp_path / 'metrics.jsonl'} failed ([Errno 28] No space left on device); "
    )
    assert str(err.value).endswith(
        "MB free there. The latest checkpoint is intact: free some space and continue with train.resume=auto."
    )
