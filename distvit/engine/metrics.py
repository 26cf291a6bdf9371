"""Training metrics between logged steps: the loss stays on the device (no per-step host sync) and is
reduced over the ranks only when a line is written, with throughput and the share of time spent waiting
for data. Also the optional per-rank trace of the samples each step trained on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distvit.data.plan import RankBatch
from distvit.engine.state import TrainState
from distvit.run.rundir import TRACE_DIR
from distvit.run.tracking import RunTracker


class MetricsMeter:
    def __init__(self, log_every: int, accelerator: Accelerator, tracker: RunTracker):
        self.log_every, self.accelerator, self.tracker = log_every, accelerator, tracker
        self.train_seconds = 0.0
        """Wall time of the logged training windows (all epochs)."""
        self.images_seen = 0
        self._start_window()

    def _start_window(self) -> None:
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.images, self.wait, self.window_start = 0, 0.0, time.perf_counter()

    def start_epoch(self) -> None:
        self._start_window()

    def timed(self, batches: Iterable) -> Iterator:
        """The batches, with the time spent waiting for each counted as data wait."""
        iterator = iter(batches)
        while True:
            wait_start = time.perf_counter()
            item = next(iterator, None)
            self.wait += time.perf_counter() - wait_start
            if item is None:
                return
            yield item

    def add(self, loss_sum: torch.Tensor, images: int) -> None:
        self.loss_sum += loss_sum
        self.images += images

    def log_if_due(self, state: TrainState, lr: float, last_of_epoch: bool, extra: dict[str, Any]) -> float | None:
        """Every train.log_every steps and at an epoch's end: one training line; returns its mean loss."""
        if state.step % self.log_every and not last_of_epoch:
            return None
        mean_loss = self.accelerator.reduce(self.loss_sum, reduction="sum").item() / self.images
        elapsed = time.perf_counter() - self.window_start
        world = self.accelerator.num_processes
        self.tracker.log(
            {
                "split": "train",
                "epoch": state.epoch + 1,
                "step": state.step,
                "loss": mean_loss,
                "lr": lr,
                "images_per_sec": self.images / elapsed,
                "images_per_sec_per_rank": self.images / elapsed / world,
                "data_wait_fraction": self.wait / elapsed,
                **extra,
            }
        )
        self.train_seconds += elapsed
        self.images_seen += self.images
        self._start_window()
        return mean_loss

    def images_per_sec(self) -> float | None:
        return self.images_seen / self.train_seconds if self.train_seconds else None


class SampleTrace:
    """RUN_DIR/trace/rank<N>.jsonl: the sample indices this rank trained on, per step (data.trace_samples)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.handle = None
        if enabled:
            (run_dir / TRACE_DIR).mkdir(parents=True, exist_ok=True)
            self.handle = open(run_dir / TRACE_DIR / f"rank{rank}.jsonl", "a", buffering=1)

    def write(self, epoch: int, step: int, batch: RankBatch) -> None:
        if self.handle is not None:
            ids = batch.indices[batch.valid].tolist()
            self.handle.write(json.dumps({"epoch": epoch, "step": step, "ids": ids}) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
