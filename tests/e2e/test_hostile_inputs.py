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

from distvit.run.checkpoint_files import save_checkpoint
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


def config_cpu_threads_beyond_the_cores(tmp_path, data):
    args = ["config", *CONFIG, f"data.path={data}", "train.cpu_threads=1000"]
    return args, data, "train.cpu_threads=1000 is more than the"


def config_num_workers_100000(tmp_path, data):
    return (
        ["config", *CONFIG, f"data.path={data}", "data.num_workers=100000"],
        data,
        "data.num_workers: Input should be less than or equal to 64 (got 100000): each worker is a process",
    )


def train_with_a_crop_padding_of_a_million(tmp_path, data):
    args = ["train", *CONFIG, f"data.path={data}", f"run.dir={tmp_path}/run", "augment.crop_padding=1000000"]
    return args, tmp_path, "augment.crop_padding=1000000 is more than half the side of the stored images"


def config_device_decoding_in_memory_mode(tmp_path, data):
    args = ["config", *CONFIG, f"data.path={data}", "data.mode=memory", "data.decode=device"]
    return args, data, "data.decode=device applies to stream mode only"


def memory_mode_with_a_manifest_claiming_16384_px_images(tmp_path, data):
    """The largest size a manifest may declare: 243 GB decoded for these 301 images."""
    _edit_manifest(data, lambda m: m.update(image_size=[16384, 16384]))
    args = ["config", *CONFIG, f"data.path={data}", "data.mode=memory"]
    return args, data, "of memory this host has available. Use data.mode=stream"


def manifest_with_flip_safe_as_a_string(tmp_path, data):
    _edit_manifest(data, lambda m: m["source"].update(flip_safe="false"))
    return ["config", *CONFIG, f"data.path={data}"], data, "source.flip_safe is 'false' (str), not true or false"


def manifest_with_an_unknown_image_format(tmp_path, data):
    _edit_manifest(data, lambda m: m["source"].update(image_format="webp"))
    return ["config", *CONFIG, f"data.path={data}"], data, "source.image_format is 'webp', not one of png, jpeg"


def prepare_synthetic_at_100000_px(tmp_path, data):
    args = ["prepare", "synthetic", "--out", str(tmp_path / "out"), "--image-size", "100000"]
    return args, tmp_path, "--image-size 100000 is larger than 16384 pixels"


def prepare_digits_more_than_the_host_holds(tmp_path, data):
    args = ["prepare", "digits", "--out", str(tmp_path / "out"), "--image-size", "16384"]
    return args, tmp_path, "px (--train-size, --test-size, --image-size) take about"


def prepare_png_with_a_jpeg_quality(tmp_path, data):
    args = ["prepare", "synthetic", "--out", str(tmp_path / "out"), "--quality", "80"]
    return args, tmp_path, "--quality 80 applies to JPEG only"


def bench_decode_with_five_images(tmp_path, data):
    args = ["bench", "decode", "--images", "5", "--batch-size", "1", "--steps", "1"]
    return args, tmp_path, "--images must be at least 10"


def bench_decode_at_100000_px(tmp_path, data):
    return ["bench", "decode", "--stored-size", "100000"], tmp_path, "--stored-size 100000 is larger than 16384"


def a_jpeg_sample_cut_short_in_training(tmp_path, data):
    """Its data ends half way, then a well-formed end marker: libjpeg only warns and fills the rest grey.
    The shard's hash is updated too, so only decoding can tell."""
    from distvit.data.manifest import read_manifest, sha256_file
    from distvit.data.prepare.synthetic import prepare_synthetic
    from distvit.data.prepare.writer import StoredFormat
    from distvit.data.read.loader import index_shards

    jpeg = tmp_path / "jpeg"
    prepare_synthetic(jpeg, train_size=200, test_size=101, samples_per_shard=64, stored_format=StoredFormat("jpeg"))
    paths, locations = index_shards(jpeg, read_manifest(jpeg), "train")
    sample = locations[70]
    with open(paths[sample.shard], "r+b") as shard:
        shard.seek(sample.image_offset)
        payload = shard.read(sample.image_size)
        scan = payload.index(b"\xff\xda")
        shard.seek(sample.image_offset)
        shard.write((payload[: scan + (len(payload) - scan) // 2] + b"\xff\xd9").ljust(len(payload), b"\0"))
    _edit_manifest(jpeg, lambda m: m["splits"]["train"]["shards"][1].update(sha256=sha256_file(paths[1])))
    args = ["train", *CONFIG, f"data.path={jpeg}", f"run.dir={tmp_path}/run", "data.mode=memory"]
    return args, jpeg, f"train-00001.tar sample {sample.key}: image cannot be decoded (IncompleteJpeg: its data ends"


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
    config_cpu_threads_beyond_the_cores,
    config_num_workers_100000,
    train_with_a_crop_padding_of_a_million,
    config_device_decoding_in_memory_mode,
    memory_mode_with_a_manifest_claiming_16384_px_images,
    manifest_with_flip_safe_as_a_string,
    manifest_with_an_unknown_image_format,
    prepare_synthetic_at_100000_px,
    prepare_digits_more_than_the_host_holds,
    prepare_png_with_a_jpeg_quality,
    bench_decode_with_five_images,
    bench_decode_at_100000_px,
    a_jpeg_sample_cut_short_in_training,
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
