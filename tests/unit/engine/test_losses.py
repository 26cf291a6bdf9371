"""distvit.engine.losses: label loss with smoothing or soft targets, DeiT distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distvit.engine.losses import distillation_loss, label_loss


def test_label_loss_matches_torch_and_soft_targets():
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    expected = F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(label_loss(logits, labels, 0.1, None), expected)
    smoothed = F.one_hot(labels, 10) * 0.9 + 0.01
    torch.testing.assert_close(label_loss(logits, labels, 0.0, smoothed), expected)


def test_distillation_losses():
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    assert distillation_loss(teacher, teacher, "soft", 3.0).abs().max() < 1e-5
    soft = distillation_loss(student, teacher, "soft", 2.0)
    # DeiT: KL summed, times tau^2, divided by batch x classes (here per sample: by the 10 classes)
    manual = (
        (F.softmax(teacher / 2, 1) * (F.log_softmax(teacher / 2, 1) - F.log_softmax(student / 2, 1))).sum(1) * 4 / 10
    )
    torch.testing.assert_close(soft, manual)
    hard = distillation_loss(student, teacher, "hard", 1.0)
    torch.testing.assert_close(hard, F.cross_entropy(student, teacher.argmax(1), reduction="none"))
