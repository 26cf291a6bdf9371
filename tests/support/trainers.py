"""An in-process Trainer on a small dataset, for unit tests of the engine's components."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from distvit.config import load_config
from distvit.data.manifest import read_manifest
from distvit.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def make_trainer(dataset, run_dir, *overrides) -> Trainer:
    """configs/demo.yaml on `dataset`: 2 epochs of batch 50, EMA on, fp32, no tracking. Close its stop
    handlers (trainer.stops.close()) when done."""
    cfg = load_config(
        REPO / "configs/demo.yaml",
        [
            f"data.path={dataset}",
            f"run.dir={run_dir}",
            "tracking.backend=none",
            "train.epochs=2",
            "train.batch_size=50",
            "ema.enabled=true",
            "train.mixed_precision=no",
            *overrides,
        ],
    )
    return Trainer(cfg, read_manifest(dataset))


@contextlib.contextmanager
def open_trainer(dataset, run_dir, *overrides) -> Iterator[Trainer]:
    """make_trainer, with its stop handlers and tracker closed afterwards whatever the test did."""
    trainer = make_trainer(dataset, run_dir, *overrides)
    try:
        yield trainer
    finally:
        trainer.stops.close()
        trainer.tracker.finish()
