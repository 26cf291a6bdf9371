"""Exact distributed evaluation: every sample counted once, whatever the world size.

Ranks take disjoint slices of the stored order (padded slots are masked, never filled with repeated
samples as `DistributedSampler` does); correct counts, sample counts, loss sums and the confusion
matrix are reduced by sum, so 1 and N ranks give the same counts. Several models (raw and EMA) are
evaluated in one pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distvit.augment.transforms import BatchTransform
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.read.loader import MemoryBatches, StreamBatches
from distvit.engine.failures import SampleFailures

NUM_SAMPLE_IMAGES = 16


@dataclass
class EvalResult:
    correct: int
    num_samples: int
    loss_sum: float
    top5_correct: int = 0
    confusion: list[list[int]] = field(default_factory=list)
    """confusion[true][predicted] counts."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few images of rank 0's first batch with label and prediction (for the tracker)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_samples if self.num_samples else float("nan")

    @property
    def top5(self) -> float:
        return self.top5_correct / self.num_samples if self.num_samples else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_samples if self.num_samples else float("nan")

    def per_class_accuracy(self) -> list[float | None]:
        """Recall of each class (None for a class without samples)."""
        return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.confusion)]

    def record(self, prefix: str = "") -> dict[str, Any]:
        """The metrics.jsonl fields of this result, keys prefixed (e.g. 'ema_')."""
        return {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}top5": self.top5,
            f"{prefix}loss": self.loss,
            f"{prefix}correct": self.correct,
            f"{prefix}per_class_accuracy": self.per_class_accuracy(),
        }


@torch.no_grad()
def evaluate_models(
    models: dict[str, torch.nn.Module],
    data: MemoryBatches | StreamBatches,
    transform: BatchTransform,
    global_batch: int,
    accelerator: Accelerator,
    num_classes: int,
) -> dict[str, EvalResult]:
    """Top-1/top-5 accuracy, mean cross-entropy and confusion matrix of each model on all of `data`."""
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    device = accelerator.device
    plan = EpochPlan(sequential_order(len(data)), global_batch, accelerator.num_processes, accelerator.process_index)
    k = min(5, num_classes)
    totals = {name: torch.zeros(4, dtype=torch.float64, device=device) for name in models}  # top1, n, loss, top5
    confusion = {name: torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) for name in models}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    failures = SampleFailures(accelerator)
    for batch, images, labels in data.epoch(plan, failures.handler):
        valid = batch.valid.to(device)
        inputs = transform(images)
        for name, model in models.items():
            with accelerator.autocast():
                logits = model(inputs)
            logits = logits.float()
            predicted = logits.argmax(dim=1)
            in_top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
            losses = F.cross_entropy(logits, labels, reduction="none")
            totals[name] += torch.stack(
                [
                    ((predicted == labels) & valid).sum().double(),
                    valid.sum().double(),
                    (losses * valid).sum().double(),
                    (in_top5 & valid).sum().double(),
                ]
            )
            confusion[name] += torch.bincount((labels * num_classes + predicted)[valid], minlength=num_classes**2)
            if accelerator.is_main_process and not samples[name]:
                count = min(NUM_SAMPLE_IMAGES, int(valid.sum()))
                # A copy: on a CPU `images` is a slot of the loader's ring, refilled by a later batch
                # (distvit.data.read.ring); the pictures must stay those of their captions.
                kept = images[:count].to("cpu", copy=True)
                samples[name] = [
                    {"image": kept[i], "label": int(labels[i]), "predicted": int(predicted[i])} for i in range(count)
                ]
    failures.check()  # a damaged sample on any rank: every rank stops with its message
    results = {}
    for name, model in models.items():
        summed = accelerator.reduce(totals[name], reduction="sum").tolist()
        matrix = accelerator.reduce(confusion[name], reduction="sum").view(num_classes, num_classes).tolist()
        model.train(modes[name])
        results[name] = EvalResult(
            correct=int(summed[0]),
            num_samples=int(summed[1]),
            loss_sum=float(summed[2]),
            top5_correct=int(summed[3]),
            confusion=matrix,
            samples=samples[name],
        )
    return results


def evaluate(
    model: torch.nn.Module,
    data: MemoryBatches | StreamBatches,
    transform: BatchTransform,
    global_batch: int,
    accelerator: Accelerator,
    num_classes: int,
) -> EvalResult:
    return evaluate_models({"model": model}, data, transform, global_batch, accelerator, num_classes)["model"]
