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

from distvit.data.loader import MemoryBatches, StreamBatches
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.transforms import BatchTransform

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
            f"{prefix}accuracy": self.accuracy, f"{prefix}top5": self.top5, f"{prefix}loss": self.loss,
            f"{prefix}correct": self.correct, f"{prefix}per_class_accuracy": self.per_class_accuracy(),
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
    for batch, images, labels in data.epoch(plan):
        valid = batch.valid.to(device)
        inputs = transform(images)
        for name, model in models.items():
            with accelerator.autocast():
                logits = model(inputs)
            logits = logits.float()
            predicted = logits.argmax(dim=1)
            in_top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
            losses = F.cross_entropy(logits, labels, reduction="none")
            totals[name] += torch.stack([
                ((predicted == labels) & valid).sum().double(), valid.sum().double(),
                (losses * valid).sum().double(), (in_top5 & valid).sum().double(),
            ])
            confusion[name] += torch.bincount((labels * num_classes + predicted)[valid], minlength=num_classes ** 2)
            if accelerator.is_main_process and not samples[name]:
                count = min(NUM_SAMPLE_IMAGES, int(valid.sum()))
                samples[name] = [
                    {"image": images[i].cpu(), "label": int(labels[i]), "predicted": int(predicted[i])}
                    for i in range(count)
                ]
    results = {}
    for name, model in models.items():
        summed = accelerator.reduce(totals[name], reduction="sum").tolist()
        matrix = accelerator.reduce(confusion[name], reduction="sum").view(num_classes, num_classes).tolist()
        model.train(modes[name])
        results[name] = EvalResult(
            correct=int(summed[0]), num_samples=int(summed[1]), loss_sum=float(summed[2]),
            top5_correct=int(summed[3]), confusion=matrix, samples=samples[name],
        )
    return results


def evaluate(
    model: torch.nn.Module, data: MemoryBatches | StreamBatches, transform: BatchTransform, global_batch: int,
    accelerator: Accelerator, num_classes: int,
) -> EvalResult:
    return evaluate_models({"model": model}, data, transform, global_batch, accelerator, num_classes)["model"]


def evaluate_checkpoint(
    source: str, data_path: str | None, split: str, weights: str, global_batch: int, mode: str = "auto",
) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate a checkpoint (or a run directory's final one) on a dataset split, on every rank this
    process group has; returns the result and what was evaluated (for the report)."""
    from distvit.checkpoint import load_model, resolve_checkpoint
    from distvit.data.loader import open_batches
    from distvit.data.manifest import read_manifest
    from distvit.errors import ConfigError, DataError
    from distvit.runtime import cpu_processes

    path = resolve_checkpoint(source)
    model, record, payload = load_model(path, weights)
    data_path = data_path or payload["config"]["data"]["path"]
    manifest = read_manifest(data_path)
    split_info = manifest.split(split, data_path, key="--split")
    if list(manifest.classes) != list(payload["classes"]):
        raise DataError(
            f"dataset {data_path} has classes {list(manifest.classes)[:5]}..., the checkpoint was trained on "
            f"{list(payload['classes'])[:5]}...: evaluate on a dataset with the same classes in the same order."
        )
    accelerator = Accelerator(cpu=cpu_processes())
    if global_batch % accelerator.num_processes:
        raise ConfigError(f"--batch-size {global_batch} must be divisible by the number of processes ({accelerator.num_processes}).")
    model.to(accelerator.device)
    data = open_batches(data_path, manifest, split, mode, 2, accelerator.device, record.img_size)
    transform = BatchTransform((record.img_size, record.img_size), record.mean, record.std)
    result = evaluate(model, data, transform, global_batch, accelerator, record.num_classes)
    about = {
        "checkpoint": str(path), "weights": weights, "data": str(data_path), "split": split,
        "num_samples_in_split": split_info.num_samples, "classes": list(payload["classes"]),
        "world_size": accelerator.num_processes, "step": payload["step"],
    }
    return result, about


def format_evaluation(result: EvalResult, about: dict[str, Any]) -> str:
    classes = about["classes"]
    lines = [
        f"{about['checkpoint']} ({about['weights']} weights, step {about['step']}) on {about['data']} "
        f"split '{about['split']}', {about['world_size']} process(es):",
        f"  top-1 {result.accuracy:.4f} ({result.correct}/{result.num_samples})  top-5 {result.top5:.4f}  loss {result.loss:.4f}",
        "  per-class accuracy:",
    ]
    width = max(len(name) for name in classes)
    for name, accuracy, row in zip(classes, result.per_class_accuracy(), result.confusion):
        shown = f"{accuracy:.4f}" if accuracy is not None else "  n/a "
        lines.append(f"    {name:<{width}}  {shown}  ({sum(row)} images)")
    if len(classes) <= 20:
        lines.append("  confusion matrix (rows: true class, columns: predicted):")
        lines += ["    " + " ".join(f"{count:5d}" for count in row) + f"  {name}" for name, row in zip(classes, result.confusion)]
    return "\n".join(lines)


def evaluation_json(result: EvalResult, about: dict[str, Any]) -> dict[str, Any]:
    return {
        **about, "accuracy": result.accuracy, "top5": result.top5, "loss": result.loss, "correct": result.correct,
        "num_samples": result.num_samples, "per_class_accuracy": result.per_class_accuracy(),
        "confusion": result.confusion,
    }
