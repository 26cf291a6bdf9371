"""PNG plots of a run directory, rebuilt from `metrics.jsonl` and `eval/confusion.json` alone.

matplotlib is imported inside the plotting functions, so importing this module stays cheap and needs
neither torch nor a display.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distvit.errors import DistvitError
from distvit.fileio import atomic_open

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Not imported from distvit.run.tracking: that module pulls in accelerate (and torch).
METRICS_NAME = "metrics.jsonl"
CONFUSION_PATH = Path("eval") / "confusion.json"
PLOTS_DIR = "plots"
# Above this many classes, per-cell numbers are unreadable.
ANNOTATE_MAX_CLASSES = 20

Series = tuple[list[float], list[float]]


def read_metrics_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every JSON object in `path`, one a line; blank or unparseable lines (a half-written last line) are skipped."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A finite float, or None for null, NaN, bools and anything else that cannot be plotted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Sequence[dict[str, Any]], x_key: str, y_key: str) -> Series:
    """(xs, ys) of the records where both keys hold plottable numbers, in file order."""
    xs: list[float] = []
    ys: list[float] = []
    for record in records:
        x, y = _number(record.get(x_key)), _number(record.get(y_key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _eval_splits(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Evaluation records grouped by split name, splits in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        split = record.get("split", "train")
        if split != "train":
            groups.setdefault(str(split), []).append(record)
    return groups


def pyplot():
    import matplotlib

    # Agg: the report runs on headless nodes and in CI, where an interactive backend would fail.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` atomically (`<name>.tmp` then rename), so a viewer never sees half a PNG, and close it."""
    plt = pyplot()
    try:
        with atomic_open(path) as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return path


def _line_plot(
    path: Path, named_series: dict[str, Series], xlabel: str, ylabel: str, title: str, log_y: bool = False
) -> Path | None:
    """One line per non-empty series; nothing is written when every series is empty."""
    named_series = {name: s for name, s in named_series.items() if s[0]}
    if not named_series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, (xs, ys) in named_series.items():
        # Markers keep a single-point series (one eval so far) visible.
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    all_y = [y for _, ys in named_series.values() for y in ys]
    if log_y and all(y > 0 for y in all_y):
        ax.set_yscale("log")
    # Steps and epochs are counts: ticks such as 0.5 would suggest points that do not exist.
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(named_series) > 1:
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    train = [r for r in records if r.get("split", "train") == "train"]
    series = {"train": _series(train, "step", "loss")}
    for split, evals in _eval_splits(records).items():
        series[split] = _series(evals, "step", "loss")
        series[f"{split} (EMA)"] = _series(evals, "step", "ema_loss")
    return _line_plot(path, series, "step", "loss", "Loss", log_y=True)


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    series: dict[str, Series] = {}
    for split, evals in _eval_splits(records).items():
        series[f"{split} top-1"] = _series(evals, "epoch", "accuracy")
        series[f"{split} top-1 (EMA)"] = _series(evals, "epoch", "ema_accuracy")
        series[f"{split} top-5"] = _series(evals, "epoch", "top5")
    return _line_plot(path, series, "epoch", "accuracy", "Evaluation accuracy")


def plot_lr(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    train = [r for r in records if r.get("split", "train") == "train"]
    return _line_plot(path, {"lr": _series(train, "step", "lr")}, "step", "learning rate", "Learning rate")


def _valid_matrix(matrix: Any, size: int) -> bool:
    return (
        isinstance(matrix, list)
        and len(matrix) == size
        and all(isinstance(row, list) and len(row) == size for row in matrix)
    )


def plot_confusion(matrix: list[list[float]], classes: Sequence[str], title_prefix: str, path: Path) -> Path:
    """Row-normalised heatmap (row = true class), raw counts written in the cells for small class counts."""
    import numpy as np

    counts = np.nan_to_num(np.asarray(matrix, dtype=float))
    row_sums = counts.sum(axis=1, keepdims=True)
    # A class absent from the eval set has an all-zero row: show it as 0, not NaN.
    normalised = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    total = counts.sum()
    accuracy = float(np.trace(counts) / total) if total > 0 else float("nan")

    size = len(classes)
    plt = pyplot()
    side = min(4 + 0.45 * size, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(size), labels=list(classes), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(size), labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title_prefix} (accuracy {accuracy:.2%})")
    if size <= ANNOTATE_MAX_CLASSES:
        for i in range(size):
            for j in range(size):
                # White on dark cells, black on light ones, so every count stays legible.
                colour = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(round(counts[i, j]))}", ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusions(confusion_path: Path, plots_dir: Path) -> list[Path]:
    """`confusion.png` and, with an "ema" matrix, `confusion_ema.png`; nothing if the file is absent or unusable."""
    try:
        data = json.loads(confusion_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # Missing, or being rewritten by a running evaluation: the other plots are still worth writing.
        return []
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        return []
    classes = [str(name) for name in data["classes"]]
    where = f"{data.get('split', 'eval')}, epoch {data.get('epoch', '?')}"
    written: list[Path] = []
    for key, filename, label in (("model", "confusion.png", "model"), ("ema", "confusion_ema.png", "EMA")):
        matrix = data.get(key)
        if classes and _valid_matrix(matrix, len(classes)):
            written.append(plot_confusion(matrix, classes, f"Confusion, {label}: {where}", plots_dir / filename))
    return written


def write_report(run_dir: str | os.PathLike) -> list[Path]:
    """Write the plots of `run_dir` into `run_dir/plots/`; return the paths written, in a fixed order."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_NAME
    if not metrics_path.is_file():
        raise DistvitError(
            f"{metrics_path} does not exist: {run_dir} is not a distvit run directory, "
            "or the run has not logged any metrics yet."
        )
    records = read_metrics_lines(metrics_path)
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    candidates = [
        plot_loss(records, plots_dir / "loss.png"),
        plot_accuracy(records, plots_dir / "accuracy.png"),
        plot_lr(records, plots_dir / "lr.png"),
    ]
    written = [path for path in candidates if path is not None]
    written.extend(plot_confusions(run_dir / CONFUSION_PATH, plots_dir))
    return written
