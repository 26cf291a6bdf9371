"""One optimizer step on this rank's share of a global batch.

Losses are sums over real samples divided by the step's global sample count, so the gradient DDP
averages is the mean over the global batch, padding excluded; gradient accumulation splits each rank's
share into micro-batches without changing that mean. Nothing in a step waits for the device.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator

from distvit.config import MixConfig, OptimConfig, TrainConfig
from distvit.data.devices import to_device
from distvit.engine.losses import distillation_loss, label_loss
from distvit.engine.mixing import apply_mix, mixed_targets, sample_mix
from distvit.engine.parts import TrainParts
from distvit.engine.seeds import step_seed
from distvit.engine.sources import StepInput
from distvit.engine.timing import PhaseTimer


class TrainStep:
    def __init__(
        self, parts: TrainParts, *, train: TrainConfig, optim: OptimConfig, mix: MixConfig, accelerator: Accelerator
    ):
        """`train`: the seed, label smoothing and micro-batches of a step; `optim`: its gradient clipping;
        `mix`: its Mixup / CutMix."""
        self.parts, self.accelerator, self.mix = parts, accelerator, mix
        self.seed, self.label_smoothing, self.micro_batches = train.seed, train.label_smoothing, train.grad_accum_steps
        self.clip_grad_norm = optim.clip_grad_norm
        self.trainable = [p for p in parts.trained.parameters() if p.requires_grad]
        self.grad_norm = torch.zeros(())
        self.compute_dtype = ""
        """dtype the classifier computed in, in the first training step: shows whether autocast was on
        (Accelerate casts the model's outputs back to float32, so the logits cannot tell)."""

    def __call__(self, data: StepInput, timer: PhaseTimer | None = None) -> torch.Tensor:
        """One optimizer step; returns the summed loss (on device). `timer` (benchmarks) marks each phase:
        the batch's fetch, then its device-side inputs (augmentation, resize, normalisation, mixing)."""
        if timer:
            timer.mark("fetch")
        x, soft, valid = self.model_input(data)
        if timer:
            timer.mark("inputs")
        loss_sum = self._forward_backward(x, data.labels, soft, valid, data.batch.global_valid)
        if timer:
            timer.mark("forward_backward")
        self._optimizer_step()
        if timer:
            timer.mark("optimizer")
        return loss_sum

    def model_input(self, data: StepInput) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The model's input (augmented, resized, normalised, mixed), soft targets if mixed, valid mask.
        The augmentation is drawn for the whole global batch from a seed of (seed, epoch, position), so it
        is the same whatever the world size or a resume."""
        batch, images, labels, local = data.batch, data.images, data.labels, data.local
        valid = to_device(batch.valid, self.accelerator.device)
        if self.parts.features_cached:
            return images, None, valid
        seed = step_seed(self.seed, data.epoch, batch.first_slot)
        augment = self.parts.augment
        if augment.recipe.active:
            generator = torch.Generator().manual_seed(seed)
            params = augment.sample(data.global_batch, tuple(images.shape[1:3]), generator)
            x = augment(images, params.slice(local.start, local.stop))
        else:
            x = self.parts.transform(images)
        decision = sample_mix(self.mix, [seed, 1], x.shape[-2], x.shape[-1])
        soft = None
        if decision.kind != "none":
            soft = mixed_targets(labels, self.parts.record.num_classes, self.label_smoothing, decision)
            x = apply_mix(x, decision)
        return x, soft, valid

    def loss(
        self, output: Any, labels: torch.Tensor, soft: torch.Tensor | None, teacher: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-sample loss: label loss (smoothing, mixing), plus DeiT's distillation term with a teacher's
        logits (weighed as the run's teacher says: distill.alpha, type, tau)."""
        head, distill_head = output if isinstance(output, tuple) else (output, output)
        loss = label_loss(head, labels, self.label_smoothing, soft)
        if teacher is None:
            return loss
        t = self.parts.teacher
        return (1 - t.alpha) * loss + t.alpha * distillation_loss(distill_head, teacher, t.kind, t.tau)

    def _forward_backward(
        self, x: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None, valid: torch.Tensor, global_valid: int
    ) -> torch.Tensor:
        """Forward and backward over the micro-batches (DDP all-reduces on the last); the summed loss."""
        accelerator, micro, parts = self.accelerator, self.micro_batches, self.parts
        size = x.shape[0] // micro
        loss_sum = torch.zeros((), device=accelerator.device)
        for index in range(micro):
            part = slice(index * size, (index + 1) * size)
            teacher = None
            if parts.teacher is not None:  # per micro-batch: accumulation bounds the teacher's memory too
                with accelerator.autocast():
                    teacher = parts.teacher.logits(x[part], parts.record.mean, parts.record.std).float()
            with nullcontext() if index == micro - 1 else accelerator.no_sync(parts.trained):
                output = parts.trained(x[part])  # prepare()d models run in autocast themselves
                soft_part = soft[part] if soft is not None else None
                losses = self.loss(output, labels[part], soft_part, teacher) * valid[part]
                accelerator.backward(losses.sum() * (accelerator.num_processes / global_valid))
            loss_sum += losses.detach().sum()
        return loss_sum

    def _optimizer_step(self) -> None:
        """Clip, step (unless fp16 overflowed), schedule, zero the gradients, update the EMA."""
        accelerator, parts = self.accelerator, self.parts
        if self.clip_grad_norm:
            self.grad_norm = accelerator.clip_grad_norm_(self.trainable, self.clip_grad_norm)
        # fp16 overflow: no step, so no schedule or EMA step. A fused optimizer is always "called" by the
        # scaler (it gets found_inf), so Accelerate's flag misses those skips; a lowered scale shows them
        # (reading the scale syncs with the device, so only where it is needed).
        scale = accelerator.scaler.get_scale() if parts.fused_fp16 else None
        parts.optimizer.step()
        skipped = accelerator.optimizer_step_was_skipped or (
            parts.fused_fp16 and accelerator.scaler.get_scale() < scale
        )
        if not skipped:
            parts.scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.ema is not None and not skipped:
            parts.ema.update(parts.model)

    def peak_lr(self) -> float:
        """The largest lr of the param groups: what the next step uses at its top layer (logged)."""
        return max(g["lr"] for g in self.parts.optimizer.param_groups)

    def log_values(self) -> dict[str, float]:
        """Per-step values worth logging beside the loss (gradient norm when clipping, the EMA's decay)."""
        values = {}
        if self.clip_grad_norm:
            values["grad_norm"] = float(self.grad_norm)
        if self.parts.ema is not None:
            values["ema_decay"] = self.parts.ema.current_decay()
        return values

    def watch_compute_dtype(self) -> None:
        """Record the classifier's output dtype once (autocast on or off)."""
        classifier = self.parts.model.get_classifier()
        if isinstance(classifier, tuple):  # distilled DeiT: (head, head_dist)
            classifier = classifier[0]

        def record_dtype(module, args, output):
            self.compute_dtype = str(output.dtype).removeprefix("torch.")
            handle.remove()

        handle = classifier.register_forward_hook(record_dtype)
