"""Evaluation during training: when it is due, the exact counts of the raw model (and the EMA), their
record in metrics.jsonl and W&B, the confusion file, and the score that decides the best checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from distvit.config import TrainConfig
from distvit.data.transforms import BatchTransform
from distvit.engine.evaluation import EvalResult, evaluate_models
from distvit.engine.state import TrainState
from distvit.fileio import atomic_write_bytes
from distvit.run.rundir import CONFUSION_NAME
from distvit.run.tracking import RunTracker


class Evaluator:
    def __init__(
        self,
        cfg: TrainConfig,
        split: str,
        data,
        transform: BatchTransform,
        classes: list[str],
        accelerator: Accelerator,
        tracker: RunTracker,
        run_dir: Path,
    ):
        self.cfg, self.split, self.data, self.transform = cfg, split, data, transform
        self.classes, self.accelerator, self.tracker, self.run_dir = classes, accelerator, tracker, run_dir
        self.seconds = 0.0
        """Time spent in evaluations during training, records included (summary.json)."""

    def due(self, epoch: int) -> bool:
        """After the last epoch always, otherwise every train.eval_every epochs."""
        every = self.cfg.eval_every
        return epoch == self.cfg.epochs or bool(every and epoch % every == 0)

    def evaluate(self, models: dict[str, torch.nn.Module]) -> dict[str, EvalResult]:
        """Exact results of each model on the evaluation split, the same on every rank."""
        return evaluate_models(
            models, self.data, self.transform, self.cfg.eval_batch_size, self.accelerator, len(self.classes)
        )

    def run(self, models: dict[str, torch.nn.Module], state: TrainState) -> float:
        """Evaluate, record (state.last_eval, the tracker, the confusion file), print; the score the best
        checkpoint is chosen by (the EMA's accuracy when there is one)."""
        start = time.perf_counter()
        try:
            return self._run(models, state)
        finally:
            self.seconds += time.perf_counter() - start

    def _run(self, models: dict[str, torch.nn.Module], state: TrainState) -> float:
        results = self.evaluate(models)
        raw, ema = results["model"], results.get("ema")
        state.last_eval = {
            "split": self.split,
            "epoch": state.epoch,
            "step": state.step,
            "num_samples": raw.num_samples,
            **raw.record(),
            **(ema.record("ema_") if ema else {}),
        }
        self.tracker.log(state.last_eval)
        self.tracker.log_images(f"{self.split}/predictions", raw.samples, state.step)
        if self.accelerator.is_main_process:
            confusion = {
                "classes": list(self.classes),
                "split": self.split,
                "epoch": state.epoch,
                "step": state.step,
                "model": raw.confusion,
                **({"ema": ema.confusion} if ema else {}),
            }
            (self.run_dir / CONFUSION_NAME).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / CONFUSION_NAME, json.dumps(confusion).encode())
        self.accelerator.print(
            f"epoch {state.epoch}: {self.split} accuracy {raw.accuracy:.4f} ({raw.correct}/{raw.num_samples}), "
            f"top-5 {raw.top5:.4f}, loss {raw.loss:.4f}"
            + (f"; EMA accuracy {ema.accuracy:.4f}, loss {ema.loss:.4f}" if ema else "")
        )
        return (ema or raw).accuracy
