"""Hostile and careless inputs through the `distvit` command, as a user or an attacker would try them.

For every case: exit status 2, exactly one `distvit: error:` message naming the file, key or sample and
what to do, no traceback anywhere, and every file of the user's that was there before byte-identical after.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from distvit.run.checkpoint import save_checkpoint
from tests.support.helpers import run_cli

pytestmark = [pytest.mark.slow]

CONFIG = ["--config", "configs/demo.yaml", "tracking.backend=none"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(dataset: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    return copy


def _edit_manifest(dataset: Path, change) -> None:
    raw = json.loads((dataset / "manifest.json").read_text())
    change(raw)
    (dataset / "manifest.json").write_text(json.dumps(raw))


def _user_folder(tmp_path: Path) -> Path:
    """A folder of someone's own results that a run.dir might point at by mistake."""
    folder = tmp_path / "experiments"
    (folder / "eval").mkdir(parents=True)
    (folder / "plots").mkdir()
    (folder / "checkpoints").mkdir()
    (folder / "eval" / "results.csv").write_text("model,acc\nmine,0.91\n")
    (folder / "plots" / "loss.png").write_bytes(b"\x89PNG my figure")
    (folder / "checkpoints" / "final.pt").write_bytes(b"my own model")
    return folder


def _finished_run(tmp_path: Path) -> Path:
    run = tmp_path / "finished"
    (run / "checkpoints").mkdir(parents=True)
    for name, text in (("config.yaml", "{}"), ("metrics.jsonl", "{}\n"), ("summary.json", "{}")):
        (run / name).write_text(text)
    return run


def _checkpoint(path: Path, payload: dict) -> Path:
    return save_checkpoint(path, payload)


def _tiny_model_payload() -> dict:
    from distvit.config import load_config
    from distvit.model.build import build_model

    cfg = load_config(None, ["surgery.img_size=32"], check_data=False)
    model, record = build_model(cfg.model, cfg.surgery, 10)
    return {"model": model.state_dict(), "surgery": record.to_dict()}


# Each case: (tmp_path, dataset) -> (command arguments, the folder whose files must stay, expected text)
def config_epochs_1e23(tmp_path, data):
    return (
        ["config", *CONFIG, f"data.path={data}", "train.epochs=1e23"],
        data,
        "train.epochs: Input should be a valid integer",
    )


def config_epochs_true(tmp_path, data):
    return (
        ["config", *CONFIG, f"data.path={data}", "train.epochs=true"],
        data,
        "train.epochs: Input should be a valid integer",
    )


def config_repeated_key(tmp_path, data):
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  path: {data}\ntrain:\n  epochs: 2\n  epochs: 20\n")
    return ["config", "--config", str(config)], tmp_path, "duplicate key 'epochs' (first at line 4)"


def config_batch_larger_than_the_split(tmp_path, data):
    return ["config", *CONFIG, f"data.path={data}", "train.batch_size=256"], data, "larger than the 200 training images"


def overwrite_of_a_users_folder(tmp_path, data):
    folder = _user_folder(tmp_path)
    args = ["train", *CONFIG, f"data.path={data}", f"run.dir={folder}", "run.overwrite=true"]
    return args, folder, "holds no distvit run"


def resume_auto_in_a_users_folder(tmp_path, data):
    folder = _user_folder(tmp_path)
    args = ["train", *CONFIG, f"data.path={data}", f"run.dir={folder}", "train.resume=auto"]
    return args, folder, "holds no distvit run"


def resume_from_another_run_into_a_finished_one(tmp_path, data):
    run = _finished_run(tmp_path)
    other = _checkpoint(tmp_path / "other" / "checkpoints" / "step_00000004.pt", {"step": 4})
    args = ["train", *CONFIG, f"data.path={data}", f"run.dir={run}", f"train.resume={other}"]
    return args, tmp_path, "is another run's checkpoint, and run.dir="


def latest_json_pointing_outside(tmp_path, data):
    run = _finished_run(tmp_path)
    (run / "summary.json").unlink()
    _checkpoint(tmp_path / "elsewhere.pt", {"step": 4})
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"file": "../../elsewhere.pt", "step": 4}))
    args = ["train", *CONFIG, f"data.path={data}", f"run.dir={run}", "train.resume=auto"]
    return args, tmp_path, "it may only name a checkpoint beside it"


def evaluate_a_forged_checkpoint(tmp_path, data):
    forged = _checkpoint(tmp_path / "forged.pt", {"model": {}, "step": 3})
    return ["evaluate", str(forged), "--data", str(data)], tmp_path, "missing or of the wrong type"


def evaluate_a_checkpoint_naming_a_hub_model(tmp_path, data):
    payload = _tiny_model_payload()
    payload["surgery"]["model_name"] = "hf-hub:someone/evil-vit"
    payload |= {"config": {"data": {"path": str(data)}}, "classes": [], "step": 1}
    checkpoint = _checkpoint(tmp_path / "hub.pt", payload)
    return ["evaluate", str(checkpoint)], tmp_path, "not in timm's local registry"


def evaluate_json_into_a_missing_folder(tmp_path, data):
    target = tmp_path / "missing" / "eval.json"
    return ["evaluate", str(tmp_path / "any"), "--json", str(target)], tmp_path, "does not exist; create it first"


def predict_a_checkpoint_naming_a_hub_model(tmp_path, data):
    payload = _tiny_model_payload()
    payload["surgery"]["model_name"] = "hf-hub:someone/evil-vit"
    payload |= {"config": {"data": {"path": str(data)}}, "classes": [str(i) for i in range(10)], "step": 1}
    checkpoint = _checkpoint(tmp_path / "hub.pt", payload)
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    return ["predict", "--checkpoint", str(checkpoint), str(image)], tmp_path, "not in timm's local registry"


def manifest_with_repeated_classes(tmp_path, data):
    _edit_manifest(data, lambda m: m.update(classes=["cat"] * len(m["classes"])))
    return ["config", *CONFIG, f"data.path={data}"], data, "appear more than once"


def manifest_with_a_shard_in_two_splits(tmp_path, data):
    def change(m):
        m["splits"]["test"]["shards"].append(dict(m["splits"]["train"]["shards"][0]))
        m["splits"]["test"]["num_samples"] += m["splits"]["train"]["shards"][0]["num_samples"]

    _edit_manifest(data, change)
    return ["config", *CONFIG, f"data.path={data}"], data, "is listed in splits 'train' and 'test'"


def manifest_with_a_huge_image_size(tmp_path, data):
    _edit_manifest(data, lambda m: m.update(image_size=[100000, 100000]))
    return ["config", *CONFIG, f"data.path={data}"], data, "is not two whole numbers from 1 to 16384"


def an_empty_evaluation_split(tmp_path, data):
    _edit_manifest(data, lambda m: m["splits"].update(val={"name": "val", "num_samples": 0, "shards": []}))
    return ["config", *CONFIG, f"data.path={data}", "data.eval_split=val"], data, "holds no images"


def a_label_out_of_range_in_training(tmp_path, data):
    """Memory mode, hashes not checked: the label check still stops it, naming the sample."""
    import io
    import tarfile

    shard = data / json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            if info.name.endswith(".cls") and info.name.startswith("train_00000002"):
                payload, info.size = b"77", 2
            tar.addfile(info, io.BytesIO(payload))
    from distvit.data.manifest import sha256_file

    def change(m):
        entry = m["splits"]["train"]["shards"][0]
        entry["num_bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)

    _edit_manifest(data, change)
    args = ["train", *CONFIG, f"data.path={data}", f"run.dir={tmp_path}/run", "data.verify=size", "data.mode=memory"]
    return args, data, "sample train_00000002: label '77' is not a class index from 0 to 9"


def prepare_imagefolder_strict_with_a_link_to_etc(tmp_path, data):
    from PIL import Image

    source = tmp_path / "photos"
    for name in ("cat", "dog"):
        (source / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 10, 10)).save(source / name / "a.png")
    (source / "etc").symlink_to("/etc", target_is_directory=True)
    args = ["prepare", "imagefolder", "--source", str(source), "--out", str(tmp_path / "out"), "--strict"]
    return args, source, "lead out of it (--strict)"


CASES = [
    config_epochs_1e23,
    config_epochs_true,
    config_repeated_key,
    config_batch_larger_than_the_split,
    overwrite_of_a_users_folder,
    resume_auto_in_a_users_folder,
    resume_from_another_run_into_a_finished_one,
    latest_json_pointing_outside,
    evaluate_a_forged_checkpoint,
    evaluate_a_checkpoint_naming_a_hub_model,
    evaluate_json_into_a_missing_folder,
    predict_a_checkpoint_naming_a_hub_model,
    manifest_with_repeated_classes,
    manifest_with_a_shard_in_two_splits,
    manifest_with_a_huge_image_size,
    an_empty_evaluation_split,
    a_label_out_of_range_in_training,
    prepare_imagefolder_strict_with_a_link_to_etc,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_a_hostile_input_is_one_clear_error_and_changes_nothing(case, small_dataset, tmp_path, monkeypatch):
    data = _copy(small_dataset, tmp_path)
    args, kept, expected = case(tmp_path, data)
    before = _snapshot(kept)
    # no network: a command that tried to fetch (a hub model named by a checkpoint) would fail differently
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli(args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("distvit: error:")]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    message = result.stderr[result.stderr.index("distvit: error:") :] if errors else ""
    # one error, on one line, or (several config values wrong at once) followed by one indented line each
    assert len(errors) == 1 and expected in message, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert _snapshot(kept) == before  # the user's files, byte for byte


def test_prepare_over_a_folder_keeps_the_users_files(small_dataset, tmp_path):
    """Not an error: preparing into a folder that holds a dataset and someone's own tar files replaces the
    dataset and leaves their files byte-identical."""
    data = _copy(small_dataset, tmp_path)
    mine = {"train-backup-2024.tar": os.urandom(64), "test-notes.tar": b"mine", "README.txt": b"about my data"}
    for name, payload in mine.items():
        (data / name).write_bytes(payload)
    result = run_cli(["prepare", "synthetic", "--out", str(data), "--train-size", "40", "--test-size", "20"])
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert all((data / name).read_bytes() == payload for name, payload in mine.items())
    assert json.loads((data / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 40
