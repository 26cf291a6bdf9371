"""distvit.tools.evaluate: the report and JSON of an evaluation (format_evaluation, evaluation_json)."""

from __future__ import annotations

import json

import pytest

from distvit.engine.eval_counts import EvalResult
from distvit.tools.evaluate import evaluation_json, format_evaluation

ABOUT = {
    "checkpoint": "runs/x/checkpoints/final.pt",
    "weights": "ema",
    "data": "data/synth",
    "split": "test",
    "num_samples_in_split": 6,
    "classes": ["cat", "dog", "bird"],
    "world_size": 2,
    "step": 40,
}


def _result() -> EvalResult:
    # 4 cats (3 right, 1 taken for a dog), 2 dogs (both right), no bird in the split
    return EvalResult(
        correct=5, num_samples=6, loss_sum=3.0, top5_correct=6, confusion=[[3, 1, 0], [0, 2, 0], [0, 0, 0]]
    )


def test_report_lines():
    assert format_evaluation(_result(), ABOUT).splitlines() == [
        "runs/x/checkpoints/final.pt (ema weights, step 40) on data/synth split 'test', 2 process(es):",
        "  top-1 0.8333 (5/6)  top-5 1.0000  loss 0.5000",
        "  per-class accuracy:",
        "    cat   0.7500  (4 images)",
        "    dog   1.0000  (2 images)",
        "    bird    n/a   (0 images)",
        "  confusion matrix (rows: true class, columns: predicted):",
        "        3     1     0  cat",
        "        0     2     0  dog",
        "        0     0     0  bird",
    ]


def test_many_classes_leave_out_the_matrix():
    classes = [f"c{i}" for i in range(21)]
    confusion = [[2 if i == j else 0 for j in range(21)] for i in range(21)]
    confusion[4][7] = 1
    result = EvalResult(correct=42, num_samples=43, loss_sum=4.3, top5_correct=43, confusion=confusion)
    lines = format_evaluation(result, {**ABOUT, "classes": classes}).splitlines()
    assert lines[1] == "  top-1 0.9767 (42/43)  top-5 1.0000  loss 0.1000"
    assert lines[3:] == [
        f"    {name:<3}  {0.6667 if name == 'c4' else 1.0:.4f}  ({3 if name == 'c4' else 2} images)" for name in classes
    ]
    assert not any("confusion" in line for line in lines)


def test_json_has_the_metrics_and_what_was_evaluated():
    data = evaluation_json(_result(), ABOUT)
    assert data == {
        **ABOUT,
        "accuracy": 5 / 6,
        "top5": 1.0,
        "loss": 0.5,
        "correct": 5,
        "num_samples": 6,
        "per_class_accuracy": [0.75, 1.0, None],
        "confusion": [[3, 1, 0], [0, 2, 0], [0, 0, 0]],
    }
    assert json.loads(json.dumps(data))["per_class_accuracy"] == [0.75, 1.0, None]  # what --json writes


def test_an_empty_split_reports_nan():
    data = evaluation_json(EvalResult(correct=0, num_samples=0, loss_sum=0.0), {**ABOUT, "classes": []})
    assert data["num_samples"] == 0 and data["accuracy"] != data["accuracy"]  # NaN, not a division error
    assert data["per_class_accuracy"] == [] and data["top5"] != data["top5"]
    assert data["loss"] == pytest.approx(float("nan"), nan_ok=True)


def test_evaluate_defaults_to_the_split_and_data_the_run_used(tmp_path, monkeypatch):
    """A run that evaluated on `val` (no `test` split in its dataset) is evaluated on `val` by default."""
    import numpy as np
    import torch

    from distvit.config import load_config
    from distvit.data.prepare.synthetic import CLASS_NAMES, generate
    from distvit.data.prepare.writer import write_dataset
    from distvit.model.build import build_model
    from distvit.run.checkpoint_files import save_checkpoint
    from distvit.tools.evaluate import evaluate_checkpoint

    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    images, labels = generate(12, 10, 32, seed=0)
    splits = {name: list(zip(images, labels)) for name in ("train", "val")}
    data = tmp_path / "data"
    write_dataset(
        data, dataset="t", classes=list(CLASS_NAMES), image_size=(32, 32), channels=3, splits=splits, source={}
    )
    cfg = load_config(None, [f"data.path={data}", "data.eval_split=val", "surgery.img_size=32"], check_data=False)
    torch.manual_seed(0)
    model, record = build_model(cfg.model, cfg.surgery, 10)
    payload = {"model": model.state_dict(), "surgery": record.to_dict(), "config": cfg.to_dict()}
    path = save_checkpoint(tmp_path / "c.pt", {**payload, "classes": list(CLASS_NAMES), "step": 3})
    result, about = evaluate_checkpoint(str(path), None, None, "model", 12)
    assert about["split"] == "val" and about["data"] == str(data) and result.num_samples == 12
    assert np.sum(result.confusion) == 12
