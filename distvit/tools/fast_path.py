"""`distvit bench train --check`: the configured fast path (precision, compile, fused kernels, device
transforms) trained side by side with an fp32 eager reference from the same weights on the same batches."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from accelerate.utils import set_seed

from distvit.engine.optim import build_optimizer
from distvit.errors import ConfigError
from distvit.model.build import build_model, set_fused_attention

LOGIT_TOLERANCE = 0.05
"""Largest logit difference allowed, as a share of the reference's largest logit (bf16 keeps 8 bits of
mantissa; twelve blocks of rounding stay well inside 5%)."""
LOSS_TOLERANCE = 0.02
"""Largest relative difference of a step's training loss."""
UPDATE_TOLERANCE = 0.25
"""Largest distance between the two models' weights after the check's steps, relative to how far the
reference's weights moved."""


def check_fast_path(trainer, steps: int = 8) -> dict[str, Any]:
    """Train the configured model (precision, compile, fused kernels, device transforms) and an fp32 eager
    reference with the same initial weights, optimizer and schedule on the same batches; compare the
    first batch's logits and every step's loss. Run it before any other step, with no drop-path."""
    cfg, device = trainer.cfg, trainer.accelerator.device
    if trainer.accelerator.num_processes > 1:
        raise ConfigError("--check compares with a single-process fp32 reference: run it on one process.")
    parts = trainer.parts
    if cfg.surgery.drop_path or parts.features_cached or parts.teacher is not None:
        raise ConfigError(
            "--check compares full forward passes without drop-path or distillation: set surgery.drop_path=0."
        )
    set_seed(cfg.train.seed)
    reference, _ = build_model(cfg.model, cfg.surgery, parts.record.num_classes)
    reference.to(device)
    same = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), parts.model.state_dict().values()))
    if not same:
        raise RuntimeError("the fp32 reference does not start from the trainer's weights")
    set_fused_attention(reference, False)
    optimizer = build_optimizer(
        reference, dataclasses.replace(cfg.optim, fused=False), cfg.surgery.lr_decay, cfg.train.batch_size
    )
    scheduler = parts.schedule.scheduler(optimizer)  # the run's own plan
    parts.trained.train()
    inputs = trainer.sources.endless_inputs()
    reference.train()
    start = {name: p.detach().float().clone() for name, p in reference.named_parameters() if p.requires_grad}
    losses, logit_error = [], None
    for step in range(steps):
        data = next(inputs)
        x, soft, valid = trainer.step.model_input(data)
        with torch.autocast(device.type, enabled=False):
            output = reference(x.float())
        if step == 0:
            fast = parts.trained(x).float().detach()  # with grad on, as in training: no extra compile
            logit_error = ((fast - output.detach()).abs().max() / output.detach().abs().max()).item()
        global_valid = data.batch.global_valid
        ref_loss = (trainer.step.loss(output.float(), data.labels, soft, None) * valid).sum() / global_valid
        ref_loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        fast_loss = trainer.step(data).item() / global_valid
        losses.append((fast_loss, ref_loss.item()))
    loss_error = max(abs(a - b) / abs(b) for a, b in losses)
    # the weight updates themselves: a fast path that applied wrong or no updates shows here even while
    # the losses still agree (a small lr, as in warmup)
    fast = dict(parts.model.named_parameters())
    ref = dict(reference.named_parameters())
    moved = torch.stack([(ref[n].detach().float() - w0).norm() for n, w0 in start.items()]).norm()
    apart = torch.stack([(fast[n].detach().float() - ref[n].detach().float()).norm() for n in start]).norm()
    update_error = (apart / moved).item() if moved > 0 else float("inf")
    return {
        "steps": steps,
        "precision": trainer.accelerator.mixed_precision,
        "compiled": parts.compiled,
        "logit_error": logit_error,
        "logit_tolerance": LOGIT_TOLERANCE,
        "loss_error": loss_error,
        "loss_tolerance": LOSS_TOLERANCE,
        "losses": losses,
        "update_error": update_error,
        "update_tolerance": UPDATE_TOLERANCE,
        "passed": logit_error <= LOGIT_TOLERANCE and loss_error <= LOSS_TOLERANCE and update_error <= UPDATE_TOLERANCE,
    }
