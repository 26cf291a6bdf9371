"""Head-only fine-tuning on cached features: the lesson's first experiment without its repeated work.

With the backbone frozen, no augmentation, no mixing, no drop-path and no teacher, every epoch pushes the
same images through the same frozen backbone to the same features; only the classifier changes. So the
features (the classifier's input, `forward_head(..., pre_logits=True)`) are computed once, split over
the ranks and gathered, and training steps run the classifier alone on them. The trained head is the one
the full forward path would give, within float tolerance (`tests/e2e/test_train_features.py`).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from distvit.augment.recipe import what_augments
from distvit.augment.transforms import BatchTransform
from distvit.config import AugmentConfig
from distvit.data.devices import to_device
from distvit.data.plan import EpochPlan
from distvit.data.read.memory import SplitTensors
from distvit.engine.failures import SampleFailures
from distvit.engine.teacher import Teacher
from distvit.model.record import SurgeryRecord


def cache_blockers(
    model: torch.nn.Module, record: SurgeryRecord, augment: AugmentConfig, mixing: bool, teacher: Teacher | None
) -> list[str]:
    """Why this run's head cannot train on cached features (empty: it can). `mixing`: whether the step
    mixes (the mix section); `teacher`: the distillation teacher, if any."""
    blockers = []
    if record.freeze != "backbone":
        blockers.append(f"surgery.freeze={record.freeze} (needs backbone)")
    augmented = what_augments(augment)
    if augmented:
        blockers.append(f"{augmented[0]} (needs {augmented[1]})")
    if mixing:
        blockers.append("mixup/cutmix is on")
    if record.drop_path:
        blockers.append(f"surgery.drop_path={record.drop_path} (the frozen backbone would be random)")
    if teacher is not None:
        blockers.append(f"distill.type={teacher.kind}")
    if not isinstance(model.get_classifier(), torch.nn.Linear) or not hasattr(model, "forward_head"):
        return [*blockers, f"{record.model_name} has no single linear classifier (a distilled DeiT has two heads)"]
    if any(p.requires_grad for name, p in model.named_parameters() if not name.startswith(_head_prefix(model))):
        blockers.append("parameters outside the classifier train")
    return blockers


def _head_prefix(model: torch.nn.Module) -> str:
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier) + "."


@torch.no_grad()
def compute_features(
    model: torch.nn.Module,
    data,
    indices: torch.Tensor,
    transform: BatchTransform,
    global_batch: int,
    accelerator: Accelerator,
) -> SplitTensors:
    """The classifier inputs for the samples `indices` of `data`, computed once across all ranks (each
    takes a share, then all gather). Returns a tensor with one row per sample of `data` (rows outside
    `indices` are zero) and the labels, on the training device."""
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    training = model.training
    model.eval()  # the frozen backbone has no random layers (see cache_blockers): eval == train
    plan = EpochPlan(indices, global_batch, world, rank)
    features: torch.Tensor | None = None
    labels = torch.zeros(len(data), dtype=torch.int64, device=device)
    failures = SampleFailures(accelerator)
    for batch, images, batch_labels in data.epoch(plan, failures.handler):
        with accelerator.autocast():
            local = model.forward_head(model.forward_features(transform(images)), pre_logits=True).float()
        gathered = accelerator.gather(local)
        slots = torch.stack(
            [to_device(batch.indices, device), to_device(batch.valid, device).long(), batch_labels], dim=1
        )
        index, valid, label = accelerator.gather(slots).unbind(1)
        keep = valid.bool()
        if features is None:
            features = torch.zeros(len(data), local.shape[1], device=device)
        # Index assignment copies: nothing kept here points into the batch (a ring slot, refilled later).
        features[index[keep]] = gathered[keep]
        labels[index[keep]] = label[keep]
    failures.check()  # a damaged sample on any rank: every rank stops with its message
    model.train(training)
    return SplitTensors(features, labels)
