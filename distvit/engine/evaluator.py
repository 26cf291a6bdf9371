"""Evaluation during training: when it is due, the exact counts of the raw model (and the EMA), their
record in metrics.jsonl and W&B, the confusion file, and the score that decides the best checkpoint.
This module reads the eval section."""

from __future__ import annotations

import json
import time

import torch

from distvit.augment.transforms import BatchTransform
from distvit.config import EvalConfig
from distvit.data.read.loader import MemoryBatches, StreamBatches
from distvit.engine.context import RunContext
from distvit.engine.eval_counts import EvalResult, evaluate_models
from distvit.engine.state import TrainState
from distvit.errors import ConfigError
from distvit.fileio import atomic_write_bytes
from distvit.run.rundir import CONFUSION_NAME


def check_eval_batch(cfg: EvalConfig, world: int) -> None:
    """eval.batch_size is a global batch: it must split evenly over the `world` ranks (checked when the
    processes exist, before anything in the run directory changes)."""
    if cfg.batch_size % world:
        raise ConfigError(
            f"eval.batch_size={cfg.batch_size} is a global batch size: it must be divisible by the number of "
            f"processes ({world}). Choose a multiple of {world}."
        )


class Evaluator:
    def __init__(
        self,
        cfg: EvalConfig,
        *,
        context: RunContext,
        data: MemoryBatches | StreamBatches,
        transform: BatchTransform,
        epochs: int,
    ):
        """`data`: the evaluation split (context.eval_split); `epochs`: train.epochs (the last is always
        evaluated)."""
        self.every, self.batch_size, self.epochs = cfg.every, cfg.batch_size, epochs
        self.context, self.data, self.transform = context, data, transform
        self.seconds = 0.0
        """Time spent in evaluations during training, records included (summary.json)."""

    def due(self, epoch: int) -> bool:
        """After the last epoch always, otherwise every eval.every epochs."""
        return epoch == self.epochs or bool(self.every and epoch % self.every == 0)

    def evaluate(self, models: dict[str, torch.nn.Module]) -> dict[str, EvalResult]:
        """Exact results of each model on the evaluation split, the same on every rank."""
        context = self.context
        return evaluate_models(
            models, self.data, self.transform, self.batch_size, context.accelerator, len(context.classes)
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
        context, split = self.context, self.context.eval_split
        results = self.evaluate(models)
        raw, ema = results["model"], results.get("ema")
        state.last_eval = {
            "split": split,
            "epoch": state.epoch,
            "step": state.step,
            "num_samples": raw.num_samples,
            **raw.record(),
            **(ema.record("ema_") if ema else {}),
        }
        context.tracker.log(state.last_eval)
        context.tracker.log_images(f"{split}/predictions", raw.samples, state.step)
        if context.accelerator.is_main_process:
            confusion = {
                "classes": list(context.classes),
                "split": split,
                "epoch": state.epoch,
                "step": state.step,
                "model": raw.confusion,
                **({"ema": ema.confusion} if ema else {}),
            }
            (context.run_dir / CONFUSION_NAME).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(context.run_dir / CONFUSION_NAME, json.dumps(confusion).encode())
        context.accelerator.print(
            f"epoch {state.epoch}: {split} accuracy {raw.accuracy:.4f} ({raw.correct}/{raw.num_samples}), "
            f"top-5 {raw.top5:.4f}, loss {raw.loss:.4f}"
            + (f"; EMA accuracy {ema.accuracy:.4f}, loss {ema.loss:.4f}" if ema else "")
        )
        return (ema or raw).accuracy
