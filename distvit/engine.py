"""The training engine: from a validated config to an evaluated, checkpointed model, on 1..N ranks.

Reads top to bottom: `Trainer.__init__` sets up Accelerate, data, model and optimizer (and restores a
checkpoint when resuming); `train_epoch` is the loop; `run` adds evaluation and checkpoints. The global
plan (`data.plan`) tells each rank which samples to take at each step, and the batch source
(`data.loader`: the split in device memory, or streamed from the shards by loader workers) delivers
exactly those, as uint8; so every rank runs the same number of steps and every sample is seen once per
epoch, also across a resume with another world size. Losses are
sums over real samples divided by the step's global sample count, so the gradient DDP averages is the
mean over the global batch, padding excluded.
"""

from __future__ import annotations

import json
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
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from distvit.checkpoint import (
    CHECKPOINT_DIR, FINAL_NAME, latest_checkpoint, load_checkpoint, load_weights, mark_latest, save_checkpoint, step_name,
)
from distvit.config import Config
from distvit.data.manifest import Manifest
from distvit.data.loader import open_batches
from distvit.data.plan import EpochPlan, epoch_order, num_steps
from distvit.data.preflight import bad_shards_message, describe, without_shards
from distvit.data.transforms import Augmentation, BatchTransform
from distvit.errors import CheckpointError, ConfigError, DataError, DistvitError
from distvit.evaluate import EvalResult, evaluate
from distvit.optim import build_optimizer, build_scheduler
from distvit.rundir import TRACE_DIR, init_run_dir, write_summary
from distvit.surgery import SurgeryRecord, build_model
from distvit.tracking import RunTracker


def step_seed(seed: int, epoch: int, first_slot: int) -> int:
    """Seed of one step's augmentation: a function of (seed, epoch, position in the epoch) only."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, first_slot]).generate_state(1)[0])


@dataclass
class TrainState:
    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Completed optimizer steps."""
    samples_in_epoch: int = 0
    """Samples of the current epoch already trained on (all ranks): where a resume continues."""
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


def check_same_model_everywhere(record: SurgeryRecord) -> None:
    """All ranks compare their post-surgery fingerprints before DDP wraps the model (its broadcast from
    rank 0 would hide a difference in the weights, though not in the plan or in what is frozen)."""
    prints = gather_object([record.fingerprint])
    differing = [rank for rank, value in enumerate(prints) if value != prints[0]]
    if differing:
        raise DistvitError(
            f"the model after surgery differs between ranks: rank(s) {differing} disagree with rank 0 "
            f"(fingerprints {', '.join(p[:12] for p in prints)}). Every rank must see the same config, "
            f"weights file and library versions (timm {record.timm_version} here)."
        )


def _resume_source(cfg: Config) -> Path | None:
    if cfg.train.resume == "auto":
        return latest_checkpoint(cfg.run.dir)
    return Path(cfg.train.resume) if cfg.train.resume else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Trainer:
    def __init__(self, cfg: Config, manifest: Manifest, bad_shards: dict[str, str] | None = None):
        self.cfg = cfg
        self.accelerator = accelerator = make_accelerator(cfg)
        self.manifest = manifest = self._without_bad_shards(manifest, bad_shards or {})
        self.run_dir = Path(cfg.run.dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        resume_path = _resume_source(cfg)
        resume = load_checkpoint(resume_path) if resume_path else None

        set_seed(cfg.train.seed)  # same initial weights on every rank
        model, self.record = build_model(cfg, manifest.num_classes)
        check_same_model_everywhere(self.record)
        if resume:  # before anything in the run directory changes
            self._check_resumable(resume, str(resume_path))
        # Every rank has passed check_run_dir before rank 0 replaces anything (NCCL's init has no barrier).
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            init_run_dir(self.run_dir, cfg, resume["step"] if resume else None)
        accelerator.wait_for_everyone()

        device = accelerator.device
        self.train_data, self.eval_data = (
            open_batches(cfg.data.path, manifest, split, cfg.data.mode, cfg.data.num_workers, device, self.record.img_size)
            for split in (cfg.data.train_split, cfg.data.eval_split)
        )
        if not len(self.train_data):
            raise DataError(f"split '{cfg.data.train_split}' of {cfg.data.path} has no samples to train on.")
        self.steps_per_epoch = num_steps(len(self.train_data), cfg.train.batch_size)
        optimizer = build_optimizer(model, cfg.optim, cfg.surgery.lr_decay)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        self.state = TrainState()
        if resume:
            load_weights(model, resume["model"], self.record, source=str(resume_path))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if resume:
            self._restore(resume)
        else:
            # Identical weights everywhere; from here each rank needs its own random stream (drop-path).
            set_seed(cfg.train.seed + accelerator.process_index)
        self.transform = BatchTransform((self.record.img_size, self.record.img_size), self.record.mean, self.record.std)
        self.tracker = RunTracker(accelerator, cfg, self.run_dir)
        self.trace = None
        if cfg.data.trace_samples:
            (self.run_dir / TRACE_DIR).mkdir(parents=True, exist_ok=True)
            self.trace = open(self.run_dir / TRACE_DIR / f"rank{accelerator.process_index}.jsonl", "a", buffering=1)
        accelerator.print(
            f"distvit: {accelerator.num_processes} process(es) on {accelerator.distributed_type.value} "
            f"({device.type}), mixed precision {accelerator.mixed_precision}; {self.record.model_name} at "
            f"{self.record.img_size}px/patch {self.record.patch_size} ({self.record.tokens_per_image} tokens, "
            f"{self.record.trainable_params:,} trainable params); {len(self.train_data)} train / "
            f"{len(self.eval_data)} {cfg.data.eval_split} images, {self.steps_per_epoch} steps/epoch of "
            f"{cfg.train.batch_size}; run dir {self.run_dir}"
            + (f"; resumed from {resume_path} at step {self.state.step}" if resume else "")
        )

    def _without_bad_shards(self, manifest: Manifest, bad: dict[str, str]) -> Manifest:
        """Unite the preflight findings of all ranks (node-local copies may differ), then stop every rank
        with the same error, or (data.bad_shards=skip) leave those shards out so all ranks plan alike."""
        found = gather_object([bad])
        union = {name: problem for per_rank in found for name, problem in per_rank.items()}
        if not union:
            return manifest
        if self.cfg.data.bad_shards == "error":
            raise DataError(bad_shards_message(self.cfg.data.path, union))
        self.accelerator.print(
            f"distvit: leaving out {len(union)} bad shard(s) (data.bad_shards=skip): {describe(self.cfg.data.path, union)}"
        )
        return without_shards(manifest, set(union), self.cfg.data.path)

    # -- resume ---------------------------------------------------------------------------------------

    def _check_resumable(self, payload: dict[str, Any], source: str) -> None:
        saved = SurgeryRecord.from_dict(payload["surgery"])
        if saved.architecture() != self.record.architecture():
            raise CheckpointError(
                f"cannot resume from {source}: it was written for {saved.architecture()}, the config builds "
                f"{self.record.architecture()}. Resume with the run's own config (RUN_DIR/config.yaml)."
            )
        data = payload["data"]
        if data["manifest"] != self.manifest.fingerprint() or data["split"] != self.cfg.data.train_split:
            raise CheckpointError(
                f"cannot resume from {source}: it trained on another dataset or split than data.path="
                f"{self.cfg.data.path} / data.train_split={self.cfg.data.train_split} (manifest fingerprint differs)."
            )
        if data["seed"] != self.cfg.train.seed:
            raise CheckpointError(
                f"cannot resume from {source} with train.seed={self.cfg.train.seed}: it used seed {data['seed']}, "
                f"and the epoch order depends on it."
            )

    def _restore(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state.step, self.state.epoch = payload["step"], payload["epoch"]
        self.state.samples_in_epoch = payload["data"]["samples_in_epoch"]
        self.state.last_eval = dict(payload["metrics"])
        rng = payload["rng"]
        if len(rng) == self.accelerator.num_processes:
            torch.set_rng_state(rng[self.accelerator.process_index]["cpu"])
            if "cuda" in rng[self.accelerator.process_index] and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng[self.accelerator.process_index]["cuda"])
        else:  # another world size: fresh, distinct streams (only drop-path draws from them)
            set_seed(self.cfg.train.seed + self.state.step * 1000 + self.accelerator.process_index)

    # -- checkpoints ----------------------------------------------------------------------------------

    def save(self, name: str) -> None:
        """All ranks call this (it gathers every rank's RNG state); rank 0 writes."""
        rng_states = gather_object([_rng_state()])
        if self.accelerator.is_main_process:
            payload = {
                "model": self.accelerator.unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": self.state.epoch,
                "step": self.state.step,
                "data": {
                    "epoch": self.state.epoch, "samples_in_epoch": self.state.samples_in_epoch,
                    "seed": self.cfg.train.seed, "manifest": self.manifest.fingerprint(),
                    "split": self.cfg.data.train_split, "global_batch": self.cfg.train.batch_size,
                },
                "rng": rng_states,
                "surgery": self.record.to_dict(),
                "classes": list(self.manifest.classes),
                "config": self.cfg.to_dict(),
                "metrics": dict(self.state.last_eval),
            }
            save_checkpoint(self.checkpoint_dir / name, payload)
            mark_latest(self.checkpoint_dir, name, self.state.step, self.state.epoch)
        self.accelerator.wait_for_everyone()

    # -- training -------------------------------------------------------------------------------------

    def _watch_compute_dtype(self) -> None:
        """Record the classifier's output dtype once (autocast on or off)."""
        classifier = self.accelerator.unwrap_model(self.model).get_classifier()
        if isinstance(classifier, tuple):  # distilled DeiT: (head, head_dist)
            classifier = classifier[0]

        def record_dtype(module, args, output):
            self.state.compute_dtype = str(output.dtype).removeprefix("torch.")
            handle.remove()

        handle = classifier.register_forward_hook(record_dtype)

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when train.stop_at_step stopped it mid-epoch."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
        data, model, optimizer = self.train_data, self.model, self.optimizer
        if not state.compute_dtype:
            self._watch_compute_dtype()
        plan = EpochPlan(
            epoch_order(len(data), cfg.train.seed, state.epoch), cfg.train.batch_size, world, rank,
            start_sample=state.samples_in_epoch,
        )
        local = slice(rank * plan.local_batch, (rank + 1) * plan.local_batch)
        model.train()
        loss_sum = torch.zeros((), device=device)  # stays on the device between logs: no per-step sync
        window_images, window_start = 0, time.perf_counter()
        progress = tqdm(
            total=len(plan), desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            disable=not accelerator.is_main_process, dynamic_ncols=True, leave=False,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        for batch, images, labels in data.epoch(plan):
            valid = batch.valid.to(device)
            augmentation = None
            if cfg.data.augment == "crop_flip":
                generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, state.epoch, batch.first_slot))
                augmentation = Augmentation.sample(plan.global_batch, cfg.data.crop_padding, True, generator)
                augmentation = augmentation.slice(local.start, local.stop)
            logits = model(self.transform(images, augmentation))
            losses = F.cross_entropy(logits.float(), labels, reduction="none") * valid
            loss = losses.sum() * (world / batch.global_valid)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            step_lr = max(g["lr"] for g in optimizer.param_groups)  # the peak lr this step used (logged)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, so no schedule step
                self.scheduler.step()
            state.step += 1
            state.samples_in_epoch += batch.global_valid
            if self.trace is not None:
                ids = batch.indices[batch.valid].tolist()
                self.trace.write(json.dumps({"epoch": state.epoch + 1, "step": state.step, "ids": ids}) + "\n")
            loss_sum += losses.detach().sum()
            window_images += batch.global_valid
            progress.update(1)
            last_of_epoch = batch.step == len(plan) - 1
            if state.step % cfg.train.log_every == 0 or last_of_epoch:
                mean_loss = accelerator.reduce(loss_sum, reduction="sum").item() / window_images
                elapsed = time.perf_counter() - window_start
                self.tracker.log({
                    "split": "train", "epoch": state.epoch + 1, "step": state.step, "loss": mean_loss,
                    "lr": step_lr, "images_per_sec": window_images / elapsed,
                    "images_per_sec_per_rank": window_images / elapsed / world,
                })
                progress.set_postfix(loss=f"{mean_loss:.3f}")
                state.train_seconds += elapsed
                state.images_seen += window_images
                loss_sum.zero_()
                window_images, window_start = 0, time.perf_counter()
            if last_of_epoch:  # run() evaluates, then checkpoints / stops as due
                state.epoch += 1
                state.samples_in_epoch = 0
            elif self._stop_due():
                self.save(step_name(state.step))
                progress.close()
                return False
            elif self._step_checkpoint_due():
                self.save(step_name(state.step))
        progress.close()
        return True

    def _stop_due(self) -> bool:
        return bool(self.cfg.train.stop_at_step) and self.state.step == self.cfg.train.stop_at_step

    def _step_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.state.step % every == 0

    def evaluate(self) -> EvalResult:
        return evaluate(self.model, self.eval_data, self.transform, self.cfg.train.eval_batch_size, self.accelerator)

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs with evaluation and checkpoints; returns the summary."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        self.tracker.start(cfg, {"surgery": self.record.to_dict(), "world_size": accelerator.num_processes})
        finished = True
        try:
            while state.epoch < cfg.train.epochs:
                if not self.train_epoch():
                    finished = False
                    break
                last = state.epoch == cfg.train.epochs
                if last or (cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0):
                    result = self.evaluate()
                    state.last_eval = _eval_record(cfg, state, result)
                    self.tracker.log(state.last_eval)
                    accelerator.print(
                        f"epoch {state.epoch}: {cfg.data.eval_split} accuracy {result.accuracy:.4f} "
                        f"({result.correct}/{result.num_samples}), loss {result.loss:.4f}"
                    )
                if last:
                    self.save(FINAL_NAME)
                    break
                if self._stop_due():
                    self.save(step_name(state.step))
                    finished = False
                    break
                if cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0:
                    self.save(f"epoch_{state.epoch:03d}.pt")
                elif self._step_checkpoint_due():
                    self.save(step_name(state.step))
        finally:
            self.tracker.finish()
            if self.trace is not None:
                self.trace.close()
        summary = self._summary(finished)
        if finished and accelerator.is_main_process:
            write_summary(self.run_dir, summary)
        if not finished:
            accelerator.print(
                f"distvit: stopped after step {state.step} (train.stop_at_step); checkpoint "
                f"{self.checkpoint_dir / step_name(state.step)}. Continue with train.resume=auto."
            )
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

    def _summary(self, finished: bool) -> dict[str, Any]:
        accelerator, state = self.accelerator, self.state
        return {
            "finished": finished,
            "final": state.last_eval,
            "checkpoint": str(self.checkpoint_dir / (FINAL_NAME if finished else step_name(state.step))),
            "world_size": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision,
            "compute_dtype": state.compute_dtype,
            "steps": state.step,
            "epochs": state.epoch,
            "train_seconds": state.train_seconds,
            "train_images_per_sec": state.images_seen / state.train_seconds if state.train_seconds else None,
            "surgery": self.record.to_dict(),
        }


def run_training(cfg: Config, manifest: Manifest, bad_shards: dict[str, str] | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint as configured; returns the run summary (also in summary.json)."""
    return Trainer(cfg, manifest, bad_shards).run()


def _eval_record(cfg: Config, state: TrainState, result: EvalResult) -> dict[str, Any]:
    return {
        "split": cfg.data.eval_split, "epoch": state.epoch, "step": state.step, "accuracy": result.accuracy,
        "num_samples": result.num_samples, "correct": result.correct, "loss": result.loss,
    }
