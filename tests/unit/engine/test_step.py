"""distvit.engine.step: one optimizer step's inputs, loss and update."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from tests.support.trainers import open_trainer


def _first_step(trainer):
    plan, local = trainer.sources.epoch_plan(0)
    return next(iter(trainer.sources.epoch_inputs(0, plan, local)))


def test_inputs_depend_on_seed_epoch_and_position_only(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        data = _first_step(trainer)
        x, soft, valid = trainer.step.model_input(data)
        again, _, _ = trainer.step.model_input(data)
        other_epoch, _, _ = trainer.step.model_input(dataclasses.replace(data, epoch=1))
        assert torch.equal(x, again) and not torch.equal(x, other_epoch)
        assert soft is None and valid.all() and x.shape == (50, 3, 32, 32)
        # two ranks' halves of the same global batch get the same augmentation as one rank's whole batch
        halves = [
            trainer.step.model_input(dataclasses.replace(data, images=data.images[s], labels=data.labels[s], local=s))[
                0
            ]
            for s in (slice(0, 25), slice(25, 50))
        ]
        assert torch.equal(torch.cat(halves), x)


def test_a_step_updates_weights_schedule_and_ema(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", "optim.clip_grad_norm=1.0", "optim.warmup_epochs=1") as trainer:
        data = _first_step(trainer)
        before = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
        lr = trainer.step.peak_lr()
        loss_sum = trainer.step(data)
        # the summed per-sample loss of the batch, close to 50 x ln(10) for a fresh 10-class head
        assert loss_sum.shape == () and 50 * 2.0 < loss_sum.item() < 50 * 3.0
        assert trainer.step.peak_lr() > lr  # linear warmup: the second step's lr is larger
        moved = [k for k, v in trainer.parts.model.state_dict().items() if not torch.equal(v, before[k])]
        assert "head.weight" in moved and "patch_embed.proj.weight" in moved
        values = trainer.step.log_values()
        assert set(values) == {"grad_norm", "ema_decay"} and values["grad_norm"] > 0
        assert trainer.parts.ema.updates == 1


def test_loss_adds_the_distillation_term_as_the_teacher_weighs_it(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
        plain = trainer.step.loss(logits, labels, None, None)
        assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
        trainer.parts.teacher = SimpleNamespace(kind="hard", alpha=0.25, tau=1.0)  # distill.type, alpha, tau
        teacher = torch.zeros(4, 10)
        teacher[:, 5] = 1  # the teacher says class 5 for every image
        mixed = trainer.step.loss(logits, labels, None, teacher)
        to_five = torch.nn.functional.cross_entropy(logits, torch.full((4,), 5), reduction="none")
        assert torch.allclose(mixed, 0.75 * plain + 0.25 * to_five)
        trainer.parts.teacher = None


def test_a_mixing_step_mixes_as_the_mix_section_says(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", "mix.mixup_alpha=0.8") as trainer:
        data = _first_step(trainer)
        x, soft, _ = trainer.step.model_input(data)
        assert soft is not None and soft.shape == (50, 10) and torch.allclose(soft.sum(1), torch.ones(50))
        trainer.step.mix = dataclasses.replace(trainer.step.mix, prob=0.0)  # no step mixes
        unmixed, none, _ = trainer.step.model_input(data)
        assert none is None and not torch.equal(unmixed, x)
