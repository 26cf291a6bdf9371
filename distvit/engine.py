"""The training engine: from a validated config to an evaluated, checkpointed model, on 1..N ranks.

Reads top to bottom: `run_training` sets up Accelerate, data, model and optimizer; `train_epoch` is the
loop; evaluation and checkpoints happen at epoch ends. Data never goes through a DataLoader here: the
whole split sits in device memory as uint8 and the global plan (`data.plan`) tells each rank which
samples to take at each step, so every rank runs the same number of steps and every sample is seen
once per epoch. Losses are sums over real samples divided by the step's global sample count, so the
gradient DDP averages is the mean over the global batch, padding excluded.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from distvit.checkpoint import CHECKPOINT_DIR, FINAL_NAME, save_checkpoint
from distvit.config import Config
from distvit.data.manifest import Manifest
from distvit.data.memory import SplitTensors, load_split
from distvit.data.plan import EpochPlan, epoch_order, num_steps
from distvit.data.transforms import Augmentation, BatchTransform
from distvit.errors import ConfigError
from distvit.evaluate import EvalResult, evaluate
from distvit.optim import build_optimizer, build_scheduler
from distvit.rundir import init_run_dir, write_summary
from distvit.surgery import SurgeryRecord, build_model
from distvit.tracking import RunTracker


def step_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of one step's augmentation: a function of (seed, epoch, step) only."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, step]).generate_state(1)[0])


@dataclass
class TrainState:
    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Completed optimizer steps."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = ""
    """dtype the classifier computed in, in the first training step: shows whether autocast was on
    (Accelerate casts the model's outputs back to float32, so the logits cannot tell)."""
    train_seconds: float = 0.0
    images_seen: int = 0


def _cpu_processes() -> bool:
    """Several ranks and no GPU: Accelerate must be told `cpu=True` to set up gloo (MULTI_CPU); without
    it every rank of `accelerate launch --multi_gpu` on a CPU machine runs alone as rank 0."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return several and not gpu


def make_accelerator(cfg: Config) -> Accelerator:
    accelerator = Accelerator(
        cpu=_cpu_processes(),
        mixed_precision=cfg.train.mixed_precision,
        log_with="wandb" if cfg.tracking.backend == "wandb" else None,
    )
    if cfg.train.batch_size % accelerator.num_processes or cfg.train.eval_batch_size % accelerator.num_processes:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} and train.eval_batch_size={cfg.train.eval_batch_size} are "
            f"global batch sizes and must be divisible by the number of processes ({accelerator.num_processes}). "
            f"Choose multiples of {accelerator.num_processes}."
        )
    return accelerator


def train_epoch(
    cfg: Config,
    state: TrainState,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: SplitTensors,
    transform: BatchTransform,
    tracker: RunTracker,
) -> None:
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    probe = None
    if not state.compute_dtype:
        def record_dtype(module, args, output):
            state.compute_dtype = str(output.dtype).removeprefix("torch.")
            probe.remove()

        classifier = accelerator.unwrap_model(model).get_classifier()
        if isinstance(classifier, tuple):  # distilled DeiT: (head, head_dist)
            classifier = classifier[0]
        probe = classifier.register_forward_hook(record_dtype)
    plan = EpochPlan(epoch_order(len(data), cfg.train.seed, state.epoch), cfg.train.batch_size, world, rank)
    local = slice(rank * plan.local_batch, (rank + 1) * plan.local_batch)
    augment = cfg.data.augment == "crop_flip"
    model.train()
    loss_sum = torch.zeros((), device=device)  # stays on the device between logs: no per-step sync
    window_images, window_start = 0, time.perf_counter()
    progress = tqdm(
        total=len(plan), desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}", disable=not accelerator.is_main_process,
        dynamic_ncols=True, leave=False, mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    for batch in plan.batches():
        indices, valid = batch.indices.to(device), batch.valid.to(device)
        augmentation = None
        if augment:
            generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, state.epoch, batch.step))
            augmentation = Augmentation.sample(plan.global_batch, cfg.data.crop_padding, True, generator)
            augmentation = augmentation.slice(local.start, local.stop)
        inputs = transform(data.images[indices], augmentation)
        labels = data.labels[indices]
        logits = model(inputs)
        losses = F.cross_entropy(logits.float(), labels, reduction="none") * valid
        loss = losses.sum() * (world / batch.global_valid)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used (logged below)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, so no schedule step
            scheduler.step()
        state.step += 1
        loss_sum += losses.detach().sum()
        window_images += batch.global_valid
        progress.update(1)
        last_of_epoch = batch.step == len(plan) - 1
        if state.step % cfg.train.log_every == 0 or last_of_epoch:
            mean_loss = accelerator.reduce(loss_sum, reduction="sum").item() / window_images
            elapsed = time.perf_counter() - window_start
            tracker.log({
                "split": "train", "epoch": state.epoch + 1, "step": state.step, "loss": mean_loss,
                "lr": step_lr, "images_per_sec": window_images / elapsed,
                "images_per_sec_per_rank": window_images / elapsed / world,
            })
            progress.set_postfix(loss=f"{mean_loss:.3f}")
            state.train_seconds += elapsed
            state.images_seen += window_images
            loss_sum.zero_()
            window_images, window_start = 0, time.perf_counter()
    progress.close()
    state.epoch += 1


def _checkpoint_payload(
    cfg: Config, state: TrainState, accelerator: Accelerator, model, optimizer, scheduler,
    record: SurgeryRecord, manifest: Manifest,
) -> dict[str, Any]:
    return {
        "model": accelerator.unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "surgery": record.to_dict(),
        "classes": list(manifest.classes),
        "config": cfg.to_dict(),
        "metrics": dict(state.last_eval),
    }


def run_training(cfg: Config, manifest: Manifest) -> dict[str, Any]:
    """Train, evaluate and checkpoint as configured; returns the run summary (also in summary.json)."""
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.run.dir)
    # Every rank has passed check_run_dir before rank 0 replaces anything (NCCL's init has no barrier).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        init_run_dir(run_dir, cfg)
    accelerator.wait_for_everyone()

    set_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    device = accelerator.device
    train_data = load_split(cfg.data.path, manifest, cfg.data.train_split).to(device)
    eval_data = load_split(cfg.data.path, manifest, cfg.data.eval_split).to(device)
    model, record = build_model(cfg, manifest.num_classes)
    steps_per_epoch = num_steps(len(train_data), cfg.train.batch_size)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Identical weights everywhere; from here each rank needs its own random stream (drop-path masks).
    set_seed(cfg.train.seed + accelerator.process_index)
    transform = BatchTransform((record.img_size, record.img_size), record.mean, record.std)

    tracker = RunTracker(accelerator, cfg, run_dir)
    tracker.start(cfg, {"surgery": record.to_dict(), "world_size": accelerator.num_processes})
    accelerator.print(
        f"distvit: {accelerator.num_processes} process(es) on {accelerator.distributed_type.value} "
        f"({device.type}), mixed precision {accelerator.mixed_precision}; {record.model_name} at "
        f"{record.img_size}px/patch {record.patch_size} ({record.tokens_per_image} tokens, "
        f"{record.trainable_params:,} trainable params); {len(train_data)} train / {len(eval_data)} "
        f"{cfg.data.eval_split} images, {steps_per_epoch} steps/epoch of {cfg.train.batch_size}; run dir {run_dir}"
    )

    state = TrainState()
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    try:
        while state.epoch < cfg.train.epochs:
            train_epoch(cfg, state, accelerator, model, optimizer, scheduler, train_data, transform, tracker)
            last = state.epoch == cfg.train.epochs
            if last or (cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0):
                result = evaluate(model, eval_data, transform, cfg.train.eval_batch_size, accelerator)
                state.last_eval = _eval_record(cfg, state, result)
                tracker.log(state.last_eval)
                accelerator.print(
                    f"epoch {state.epoch}: {cfg.data.eval_split} accuracy {result.accuracy:.4f} "
                    f"({result.correct}/{result.num_samples}), loss {result.loss:.4f}"
                )
            periodic = cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0
            if last or periodic:
                if accelerator.is_main_process:
                    name = FINAL_NAME if last else f"epoch_{state.epoch:03d}.pt"
                    payload = _checkpoint_payload(cfg, state, accelerator, model, optimizer, scheduler, record, manifest)
                    save_checkpoint(checkpoint_dir / name, payload)
                accelerator.wait_for_everyone()
    finally:
        tracker.finish()

    summary = {
        "final": state.last_eval,
        "checkpoint": str(checkpoint_dir / FINAL_NAME),
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "compute_dtype": state.compute_dtype,
        "steps": state.step,
        "epochs": state.epoch,
        "train_seconds": state.train_seconds,
        "train_images_per_sec": state.images_seen / state.train_seconds if state.train_seconds else None,
        "surgery": record.to_dict(),
    }
    if accelerator.is_main_process:
        write_summary(run_dir, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _eval_record(cfg: Config, state: TrainState, result: EvalResult) -> dict[str, Any]:
    return {
        "split": cfg.data.eval_split, "epoch": state.epoch, "step": state.step, "accuracy": result.accuracy,
        "num_samples": result.num_samples, "correct": result.correct, "loss": result.loss,
    }
