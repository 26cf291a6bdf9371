"""`distvit sweep report SWEEP_DIR`: what the sweep found.

SWEEP_DIR/report/trials.txt     the table: trial, parameters, objective, epochs run, state, time
SWEEP_DIR/report/trials.csv     the same, one row per trial
SWEEP_DIR/report/objective.png  the objective by trial (pruned trials: their last evaluation)
SWEEP_DIR/report/params.png     each parameter against the objective
SWEEP_DIR/report/importances.png  parameter importances (Optuna's fANOVA; from 2 complete trials)
SWEEP_DIR/best.yaml             the best complete trial's config, ready to train (run.dir runs/NAME-best)

A pruned trial's objective is its last evaluation, at fewer epochs than a complete one: the table says
how many.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distvit.config import build_config, parse_yaml
from distvit.fileio import atomic_write_bytes
from distvit.run.plots import pyplot, save_figure
from distvit.sweep.folder import BEST, REPORT, load_sweep, trial_dir
from distvit.sweep.spec import SweepSpec
from distvit.sweep.study import SweepStudy
from distvit.sweep.trial import evaluations, read_outcome


@dataclass(frozen=True)
class Row:
    trial: int
    params: dict[str, Any]
    objective: float | None
    epochs: int | None
    state: str
    seconds: float | None
    note: str = ""


def trial_rows(spec: SweepSpec, study: SweepStudy) -> list[Row]:
    rows = []
    now = datetime.datetime.now()
    for trial in study.trials():
        run_dir = trial_dir(spec.dir, trial.number)
        evaluated = evaluations(run_dir, spec.objective.split, spec.objective.metric)
        outcome = read_outcome(run_dir, spec.objective.metric)
        epochs = outcome.epochs if outcome is not None and outcome.epochs is not None else max(evaluated, default=None)
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        seconds = None
        if trial.datetime_start is not None:
            seconds = ((trial.datetime_complete or now) - trial.datetime_start).total_seconds()
        note = trial.user_attrs.get("note", "")
        rows.append(Row(trial.number, dict(trial.params), value, epochs, trial.state.name, seconds, note))
    return rows


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(spec: SweepSpec, rows: list[Row]) -> str:
    names = [param.name for param in spec.space]
    header = ["trial", *names, spec.objective.metric, "epochs", "state", "seconds"]
    cells = [
        [f"{r.trial:04d}", *(_shown(r.params.get(n)) for n in names), _shown(r.objective), _shown(r.epochs), r.state]
        + [f"{r.seconds:.0f}" if r.seconds is not None else ""]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *cells)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *cells]]
    counts = {state: sum(r.state == state for r in rows) for state in dict.fromkeys(r.state for r in rows)}
    best = best_row(spec, rows)
    summary = f"{spec.name}: {len(rows)} trials (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"
    if best is not None:
        summary += f"; best: trial {best.trial:04d}, {spec.objective.metric} {best.objective:.4g}"
    return "\n".join([summary, *lines]) + "\n"


def best_row(spec: SweepSpec, rows: list[Row]) -> Row | None:
    complete = [r for r in rows if r.state == "COMPLETE" and r.objective is not None]
    if not complete:
        return None
    sign = 1 if spec.objective.direction == "maximize" else -1
    return max(complete, key=lambda r: (sign * r.objective, -r.trial))


def _csv(spec: SweepSpec, rows: list[Row]) -> bytes:
    names = [param.name for param in spec.space]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *names, spec.objective.metric, "epochs", "state", "seconds", "note"])
    for r in rows:
        writer.writerow([r.trial, *(r.params.get(n) for n in names), r.objective, r.epochs, r.state, r.seconds, r.note])
    return out.getvalue().encode()


def _objective_plot(spec: SweepSpec, rows: list[Row], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x"), ("RUNNING", ".")):
        points = [(r.trial, r.objective) for r in rows if r.state == state and r.objective is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, label=state.lower())
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{spec.objective.split} {spec.objective.metric}")
    ax.set_title(f"{spec.name}: objective by trial ({spec.objective.direction})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def _params_plot(spec: SweepSpec, rows: list[Row], path: Path) -> Path:
    plt = pyplot()
    params = list(spec.space)
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 4), dpi=100, squeeze=False)
    for ax, param in zip(axes[0], params):
        scored = [r for r in rows if r.objective is not None and param.name in r.params]
        if param.kind in ("choice", "grid"):
            labels = [str(v) for v in param.values]
            xs = [labels.index(str(r.params[param.name])) for r in scored]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = [r.params[param.name] for r in scored]
            if param.kind == "loguniform":
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short ranges
        colors = ["tab:blue" if r.state == "COMPLETE" else "tab:gray" for r in scored]
        ax.scatter(xs, [r.objective for r in scored], c=colors)
        ax.set_xlabel(param.name)
        ax.set_ylabel(spec.objective.metric)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{spec.name}: parameters against the objective (grey: pruned)")
    fig.tight_layout()
    return save_figure(fig, path)


def _importances_plot(spec: SweepSpec, study: SweepStudy, path: Path) -> Path | None:
    """None when Optuna cannot tell importances yet (fewer than 2 complete trials, one value only)."""
    try:
        importances = study.optuna.importance.get_param_importances(study.study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    if not importances or not all(math.isfinite(v) for v in importances.values()):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 1 + 0.5 * len(importances)), dpi=100)
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, complete trials)")
    ax.set_title(f"{spec.name}: parameter importances")
    fig.tight_layout()
    return save_figure(fig, path)


def write_best(spec: SweepSpec, best: Row) -> Path:
    """best.yaml: the best trial's config as it trained, in a new run folder of its own."""
    raw = parse_yaml((trial_dir(spec.dir, best.trial) / "config.yaml").read_text())
    raw["run"].update(dir=str(Path("runs") / f"{spec.name}-best"), overwrite=False)
    raw["train"]["resume"] = ""
    raw["tracking"]["run_name"] = f"{spec.name}-best"
    cfg = build_config(raw, f"trial {best.trial} of sweep {spec.name}", check_data=False)
    params = ", ".join(f"{k}={_shown(v)}" for k, v in best.params.items())
    header = (
        f"# The best trial of sweep {spec.name} ({spec.dir}): trial {best.trial:04d}, {spec.objective.split} "
        f"{spec.objective.metric} {best.objective:.4g}\n# {params}\n"
        "# Train it: accelerate launch distvit/train.py --config best.yaml (set data.path to all your data)\n"
    )
    path = spec.dir / BEST
    atomic_write_bytes(path, (header + yaml.safe_dump(cfg.to_dict(), sort_keys=False)).encode())
    return path


def sweep_report(sweep_dir: str | Path) -> tuple[str, list[Path]]:
    """The table (also printed by the command) and the files written."""
    spec = load_sweep(sweep_dir)
    study = SweepStudy(spec)
    rows = trial_rows(spec, study)
    out = spec.dir / REPORT
    out.mkdir(exist_ok=True)
    table = format_table(spec, rows)
    atomic_write_bytes(out / "trials.txt", table.encode())
    atomic_write_bytes(out / "trials.csv", _csv(spec, rows))
    written = [out / "trials.txt", out / "trials.csv"]
    if rows:
        written += [_objective_plot(spec, rows, out / "objective.png"), _params_plot(spec, rows, out / "params.png")]
        importances = _importances_plot(spec, study, out / "importances.png")
        written += [importances] if importances else []
    best = best_row(spec, rows)
    if best is not None:
        written.append(write_best(spec, best))
    return table, written
