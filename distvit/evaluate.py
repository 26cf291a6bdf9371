"""Exact distributed evaluation: every sample counted once, whatever the world size.

Ranks take disjoint slices of the stored order (padded slots are masked, never filled with repeated
samples as `DistributedSampler` does); correct counts, sample counts and loss sums are reduced by sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distvit.data.loader import MemoryBatches, StreamBatches
from distvit.data.plan import EpochPlan, sequential_order
from distvit.data.transforms import BatchTransform


@dataclass
class EvalResult:
    correct: int
    num_samples: int
    loss_sum: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_samples if self.num_samples else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_samples if self.num_samples else float("nan")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: MemoryBatches | StreamBatches,
    transform: BatchTransform,
    global_batch: int,
    accelerator: Accelerator,
) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of `model` on all of `data`, summed over ranks."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    plan = EpochPlan(sequential_order(len(data)), global_batch, accelerator.num_processes, accelerator.process_index)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, samples, loss sum
    for batch, images, labels in data.epoch(plan):
        valid = batch.valid.to(device)
        with accelerator.autocast():
            logits = model(transform(images))
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        totals[0] += ((logits.argmax(dim=1) == labels) & valid).sum()
        totals[1] += valid.sum()
        totals[2] += (losses * valid).sum()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    return EvalResult(correct=int(totals[0].item()), num_samples=int(totals[1].item()), loss_sum=float(totals[2].item()))
