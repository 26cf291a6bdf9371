"""Per-sample training losses: the engine masks padded samples and normalises by the global count.

Not timm's `SoftTargetCrossEntropy`/`LabelSmoothingCrossEntropy`: they return the batch mean, and padded
samples must be masked out per sample first."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_loss(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float, soft_targets: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy per sample, against hard labels (with label smoothing) or mixed soft targets."""
    if soft_targets is None:
        return F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
    return -(soft_targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """DeiT's distillation term per sample: soft = tau^2 x KL(teacher || student) at temperature tau,
    divided by the class count as DeiT's reference does (it divides the summed KL by batch x classes), so
    its alpha and tau carry over; hard = cross-entropy against the teacher's argmax."""
    if kind == "hard":
        return F.cross_entropy(student.float(), teacher.argmax(dim=-1), reduction="none")
    log_student = F.log_softmax(student.float() / tau, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / tau, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=-1)
    return kl * (tau * tau) / student.shape[-1]
