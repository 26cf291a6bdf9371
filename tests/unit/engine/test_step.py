"""distvit.engine.step: one optimizer step's inputs, loss and update."""

from __future__ import annotations

import torch

from tests.support.trainers import open_trainer


def test_inputs_depend_on_seed_epoch_and_position_only(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        plan, local = trainer.sources.epoch_plan(0)
        batch, images, labels = next(iter(trainer.sources.train.epoch(plan)))
        x, soft, valid = trainer.step.inputs(batch, images, labels, local, plan.global_batch, epoch=0)
        again, _, _ = trainer.step.inputs(batch, images, labels, local, plan.global_batch, epoch=0)
        other_epoch, _, _ = trainer.step.inputs(batch, images, labels, local, plan.global_batch, epoch=1)
        assert torch.equal(x, again) and not torch.equal(x, other_epoch)
        assert soft is None and valid.all() and x.shape == (50, 3, 32, 32)
        # two ranks' halves of the same global batch get the same augmentation as one rank's whole batch
        halves = [
            trainer.step.inputs(batch, images[s], labels[s], s, plan.global_batch, epoch=0)[0]
            for s in (slice(0, 25), slice(25, 50))
        ]
        assert torch.equal(torch.cat(halves), x)


def test_a_step_updates_weights_schedule_and_ema(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r", "optim.clip_grad_norm=1.0", "optim.warmup_epochs=1") as trainer:
        plan, local = trainer.sources.epoch_plan(0)
        batch, images, labels = next(iter(trainer.sources.train.epoch(plan)))
        before = {k: v.clone() for k, v in trainer.parts.model.state_dict().items()}
        lr = trainer.step.peak_lr()
        loss_sum = trainer.step(batch, images, labels, local, plan.global_batch, epoch=0)
        # the summed per-sample loss of the batch, close to 50 x ln(10) for a fresh 10-class head
        assert loss_sum.shape == () and 50 * 2.0 < loss_sum.item() < 50 * 3.0
        assert trainer.step.peak_lr() > lr  # linear warmup: the second step's lr is larger
        moved = [k for k, v in trainer.parts.model.state_dict().items() if not torch.equal(v, before[k])]
        assert "head.weight" in moved and "patch_embed.proj.weight" in moved
        values = trainer.step.log_values()
        assert set(values) == {"grad_norm", "ema_decay"} and values["grad_norm"] > 0
        assert trainer.parts.ema.updates == 1


def test_loss_adds_the_distillation_term(small_dataset, tmp_path):
    with open_trainer(small_dataset, tmp_path / "r") as trainer:
        logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
        plain = trainer.step.loss(logits, labels, None, None)
        assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
        trainer.step.distill_cfg = type(trainer.cfg.distill)(type="hard", teacher="x", alpha=0.5)
        teacher = torch.zeros(4, 10)
        teacher[:, 5] = 1  # the teacher says class 5 for every image
        mixed = trainer.step.loss(logits, labels, None, teacher)
        to_five = torch.nn.functional.cross_entropy(logits, torch.full((4,), 5), reduction="none")
        assert torch.allclose(mixed, 0.5 * plain + 0.5 * to_five)
