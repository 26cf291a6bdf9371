"""`distvit evaluate`, `predict` and `report` on the trained demo model (the README's main job)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from distvit.data.manifest import read_manifest
from distvit.data.read.memory import load_split
from tests.support.helpers import accelerate_launch, run_cli
from tests.support.images import damage_stored_image

pytestmark = [pytest.mark.slow]


@pytest.mark.distributed
def test_evaluate_gives_identical_counts_on_one_and_two_ranks(demo_run, tmp_path):
    run_dir = demo_run[0]
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}.json"
        # 333: not a multiple of anything here, so the last batch is padded and masked on 2 ranks (uneven)
        result = accelerate_launch(
            ranks,
            ["-m", "distvit.cli", "evaluate", str(run_dir), "--batch-size", "334", "--json", str(out)],
            script=None,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        results[ranks] = json.loads(out.read_text())
        assert f"{ranks} process(es)" in result.stdout and "confusion matrix" in result.stdout
    one, two = results[1], results[2]
    assert one["world_size"] == 1 and two["world_size"] == 2
    for key in ("correct", "num_samples", "confusion", "per_class_accuracy"):
        assert one[key] == two[key], key
    assert one["num_samples"] == 1000 and sum(map(sum, one["confusion"])) == 1000
    assert one["top5"] >= one["accuracy"]
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert abs(one["correct"] - final["correct"]) <= 2  # training evaluated in batches of 500 on 2 ranks


@pytest.mark.distributed
def test_a_damaged_sample_in_a_two_rank_evaluation_stops_both_ranks_with_its_message(demo_run, demo_dataset, tmp_path):
    """Stream mode: rank 1's first sample cannot be decoded; both ranks finish reading, then stop together
    with that sample's message (not a lost-peer error), and no --json is written."""
    from distvit.data.plan import EpochPlan, sequential_order

    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    first_of_rank_1 = int(next(EpochPlan(sequential_order(1000), 334, 2, 1).batches()).indices[0])
    key = damage_stored_image(data, "test", first_of_rank_1)
    out = tmp_path / "eval.json"
    args = ["evaluate", str(demo_run[0]), "--data", str(data), "--mode", "stream", "--batch-size", "334"]
    result = accelerate_launch(2, ["-m", "distvit.cli", *args, "--json", str(out)], script=None)
    output = result.stdout + result.stderr
    errors = [line[line.index("distvit: error:") :] for line in output.splitlines() if "distvit: error:" in line]
    assert result.returncode != 0 and len(errors) == 1, output[-3000:]
    assert f"sample {key}" in errors[0] and errors[0].endswith("(found by rank 1)"), errors
    assert "lost contact" not in output and "exitcode  : 1" not in output and not out.exists()


def test_predict_names_the_right_classes(demo_run, demo_dataset, tmp_path):
    run_dir = demo_run[0]
    manifest = read_manifest(demo_dataset)
    test = load_split(demo_dataset, manifest, "test")
    paths, labels = [], []
    for index in range(0, 1000, 50):  # 20 images across the classes, as PNG files a user would have
        path = tmp_path / f"image{index}.png"
        Image.fromarray(test.images[index].numpy()).resize((96, 96), Image.NEAREST).save(path)  # not the stored size
        paths.append(str(path))
        labels.append(manifest.classes[int(test.labels[index])])
    result = run_cli(["predict", "--checkpoint", str(run_dir), "--top-k", "3", "--json", *paths])
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = json.loads(result.stdout)
    assert [p["path"] for p in predictions] == paths
    top1 = [p["top"][0]["class"] for p in predictions]
    assert np.mean([a == b for a, b in zip(top1, labels)]) >= 0.85, list(zip(top1, labels))
    assert all(len(p["top"]) == 3 and p["top"][0]["probability"] >= p["top"][1]["probability"] for p in predictions)


def test_report_redraws_the_plots(demo_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(demo_run[0], run_dir, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    shutil.rmtree(run_dir / "plots")
    result = run_cli(["report", str(run_dir)])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "accuracy.png",
        "confusion.png",
        "loss.png",
        "lr.png",
    ]
    missing = run_cli(["report", str(tmp_path / "nothing")])
    assert missing.returncode == 2 and "metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_evaluate_and_predict_errors_are_actionable(demo_run, tmp_path):
    run_dir = demo_run[0]
    no_ema = run_cli(["evaluate", str(run_dir), "--weights", "ema"])
    assert no_ema.returncode == 2 and "ema.enabled=false" in no_ema.stderr
    unfinished = run_cli(["evaluate", str(tmp_path)])
    assert unfinished.returncode == 2 and "has no checkpoints/final.pt" in unfinished.stderr
    both = run_cli(["predict", "--checkpoint", str(run_dir), "--model", "deit_tiny_patch16_224", "x.png"])
    assert both.returncode == 2 and "either --checkpoint" in both.stderr


def test_the_augmentation_is_shown_in_words_and_flipping_digits_is_a_warning(tmp_path):
    data = tmp_path / "digits"
    assert run_cli(["prepare", "digits", "--out", str(data), "--train-size", "40", "--test-size", "20"]).returncode == 0
    assert not read_manifest(data).flip_safe
    config = ["config", "--config", "configs/demo.yaml", f"data.path={data}", "train.batch_size=20"]
    flipped = run_cli(config)
    assert flipped.returncode == 0
    assert flipped.stdout.endswith("# augmentation: random crop (zero padding 4 px) -> horizontal flip p=0.5\n")
    warning = (
        f"distvit: warning: {data} is marked not flip-safe (prepared with --no-flip: a flip changes what its "
        "images mean) but the augmentation flips with p=0.5; set augment.hflip=0."
    )
    assert flipped.stderr.strip() == warning
    unflipped = run_cli([*config, "augment.hflip=0"])
    assert unflipped.returncode == 0 and unflipped.stderr == ""
    assert unflipped.stdout.endswith("# augmentation: random crop (zero padding 4 px)\n")
    trained = run_cli(
        [
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.path={data}",
            f"run.dir={tmp_path}/run",
            "train.epochs=1",
            "train.batch_size=20",
            "tracking.backend=none",
            "augment.preset=deit",
        ]
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "; augmentation: horizontal flip p=0.5 -> random-resized crop (area 0.08-1, aspect 3/4-4/3) -> " in (
        trained.stdout
    )
    assert "each sample 3x per epoch;" in trained.stdout and warning in trained.stdout
    assert "6 steps/epoch of 20" in trained.stdout  # 3 x 40 samples
