"""distvit.run.plots: plots rebuilt from a run directory's files, without torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distvit.errors import DistvitError
from distvit.run.plots import read_metrics_lines, write_report

CLASSES = ["airplane", "cat", "dog"]


def _train_line(step: int, loss: float | None) -> dict:
    return {
        "split": "train",
        "epoch": step // 4,
        "step": step,
        "loss": loss,
        "lr": 1e-4 * (step + 1),
        "images_per_sec": 512.0,
    }


def _eval_line(epoch: int, step: int, accuracy: float) -> dict:
    return {
        "split": "test",
        "epoch": epoch,
        "step": step,
        "accuracy": accuracy,
        "top5": 1.0,
        "loss": 1.0 - accuracy,
        "num_samples": 30,
        "correct": int(accuracy * 30),
        "per_class_accuracy": [accuracy] * 3,
        "ema_accuracy": accuracy + 0.02,
        "ema_top5": 1.0,
        "ema_loss": 0.9 - accuracy,
        "ema_per_class_accuracy": [accuracy + 0.02] * 3,
    }


def _write_metrics(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n\n" + tail)


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes().startswith(b"\x89PNG")
    assert matplotlib.image.imread(path).shape[0] > 100


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    records = [_train_line(step, 2.0 / (step + 1)) for step in range(8)]
    records.insert(3, _train_line(99, None))  # a NaN loss, written as null
    records.insert(4, _eval_line(0, 4, 0.6))
    records.append(_eval_line(1, 8, 0.75))
    _write_metrics(run_dir, records, tail='{"split": "train", "epoch": 2, "st')  # killed mid-write
    (run_dir / "eval").mkdir()
    confusion = {
        "classes": CLASSES,
        "split": "test",
        "epoch": 1,
        "step": 8,
        "model": [[8, 1, 1], [2, 7, 1], [0, 3, 7]],
        "ema": [[9, 1, 0], [1, 8, 1], [0, 2, 8]],
    }
    (run_dir / "eval" / "confusion.json").write_text(json.dumps(confusion))
    return run_dir


def test_read_metrics_lines_skips_blank_and_partial_lines(full_run: Path):
    records = read_metrics_lines(full_run / "metrics.jsonl")
    assert len(records) == 11
    assert [r["split"] for r in records].count("test") == 2
    assert any(r["loss"] is None for r in records)


def test_write_report_writes_every_plot(full_run: Path):
    written = write_report(full_run)
    plots = full_run / "plots"
    names = ["loss.png", "accuracy.png", "lr.png", "confusion.png", "confusion_ema.png"]
    assert written == [plots / name for name in names]
    assert sorted(p.name for p in plots.iterdir()) == sorted(names)  # no .tmp left behind
    for path in written:
        _assert_png(path)


def test_write_report_is_repeatable(full_run: Path):
    # Rerunning over existing plots (a live run, regenerated) replaces them in place.
    first = write_report(full_run)
    assert write_report(full_run) == first
    assert not list((full_run / "plots").glob("*.tmp"))


def test_train_only_run_skips_eval_plots(tmp_path: Path):
    run_dir = tmp_path / "run"
    _write_metrics(run_dir, [_train_line(step, 1.0 / (step + 1)) for step in range(5)])
    written = write_report(run_dir)
    assert [p.name for p in written] == ["loss.png", "lr.png"]
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["loss.png", "lr.png"]
    for path in written:
        _assert_png(path)


def test_missing_metrics_is_a_user_error(tmp_path: Path):
    with pytest.raises(DistvitError) as info:
        write_report(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "metrics.jsonl") in message
    assert "not a distvit run directory" in message
    assert not (tmp_path / "plots").exists()
