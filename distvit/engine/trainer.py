"""The training engine: from a validated config to an evaluated, checkpointed model, on 1..N ranks.

Reads top to bottom: `Trainer.__init__` sets up Accelerate, data, model, optimizer, EMA and teacher (and
restores a checkpoint when resuming); `train_epoch` is the loop and `train_step` one optimizer step;
`run` adds evaluation, checkpoints, stop requests and the export. The global plan (`data.plan`) tells
each rank which samples to take at each step, and the batch source (`data.loader`) delivers exactly
those, as uint8; so every rank runs the same number of steps and every sample is seen once per epoch,
also across a resume with another world size. Losses are sums over real samples divided by the step's
global sample count, so the gradient DDP averages is the mean over the global batch, padding excluded;
gradient accumulation splits each rank's share into micro-batches without changing that mean.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from distvit.run.checkpoint import BEST_NAME, CHECKPOINT_DIR, FINAL_NAME, LATEST_NAME, latest_checkpoint, load_checkpoint, load_weights, mark_latest, prune_periodic, save_checkpoint, step_name
from distvit.config import Config
from distvit.data.loader import MemoryBatches, open_batches
from distvit.data.manifest import Manifest
from distvit.data.memory import SplitTensors
from distvit.data.plan import EpochPlan, epoch_order, num_steps, sequential_order, subset_indices
from distvit.data.preflight import bad_shards_message, describe, without_shards
from distvit.data.transforms import Augmentation, BatchTransform
from distvit.data.devices import to_device
from distvit.engine.teacher import load_teacher
from distvit.engine.ema import ModelEma, decay_for_run
from distvit.errors import CheckpointError, ConfigError, DataError, PeerFailure, RunFinished
from distvit.engine.evaluation import EvalResult, evaluate_models
from distvit.model.export import export_model
from distvit.engine.features import cache_blockers, compute_features
from distvit.fileio import atomic_write_bytes
from distvit.engine.losses import distillation_loss, label_loss
from distvit.engine.mixing import apply_mix, mixed_targets, sample_mix
from distvit.engine.optim import build_optimizer, build_scheduler, lr_multiplier
from distvit.run.rundir import CONFUSION_NAME, STOPPED_NAME, TRACE_DIR, init_run_dir, write_summary
from distvit.engine.runtime import PeerMonitor, check_same_model_everywhere, compile_supported, ddp_options, is_peer_failure, make_accelerator, rng_state, step_seed
from distvit.model.build import set_fused_attention
from distvit.engine.stopping import StopRequests
from distvit.model.build import build_model
from distvit.model.record import SurgeryRecord
from distvit.engine.timing import PhaseTimer
from distvit.run.tracking import RunTracker

PLANNED_STOP = "train.stop_at_step"


@dataclass
class TrainState:
    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Completed optimizer steps."""
    samples_in_epoch: int = 0
    """Samples of the current epoch already trained on (all ranks): where a resume continues."""
    last_eval: dict[str, Any] = field(default_factory=dict)
    best_score: float = -math.inf
    compute_dtype: str = ""
    """dtype the classifier computed in, in the first training step: shows whether autocast was on
    (Accelerate casts the model's outputs back to float32, so the logits cannot tell)."""
    train_seconds: float = 0.0
    images_seen: int = 0
    compile_seconds: float = 0.0
    feature_seconds: float = 0.0
    """Time spent computing the cached backbone features (head-only runs)."""


def _resume_source(cfg: Config) -> Path | None:
    if cfg.train.resume == "auto":
        return latest_checkpoint(cfg.run.dir)
    return Path(cfg.train.resume) if cfg.train.resume else None


class Trainer:
    def __init__(
        self, cfg: Config, manifest: Manifest, bad_shards: dict[str, str] | None = None,
        splits: dict[str, SplitTensors] | None = None,
    ):
        """`splits`: in-memory data by split name instead of the shards of cfg.data.path (benchmarks)."""
        self.cfg = cfg
        self.accelerator = accelerator = make_accelerator(cfg)
        self.monitor = PeerMonitor(accelerator.num_processes, cfg.train.timeout_s)
        self.manifest = manifest = self._without_bad_shards(manifest, bad_shards or {})
        self.data_image_size = list(manifest.image_size) if manifest.image_size else None
        """The size images are stored at (checkpoints and exports keep it for `distvit predict`)."""
        self.run_dir = Path(cfg.run.dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.resume_path = _resume_source(cfg)
        resume = load_checkpoint(self.resume_path) if self.resume_path else None

        set_seed(cfg.train.seed)  # same initial weights on every rank
        model, self.record = build_model(cfg.model, cfg.surgery, manifest.num_classes)
        check_same_model_everywhere(self.record)
        if resume:  # before anything in the run directory changes
            self._check_resumable(resume, str(self.resume_path))
        # Every rank has passed check_run_dir before rank 0 replaces anything (NCCL's init has no barrier).
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            init_run_dir(self.run_dir, cfg, resume["step"] if resume else None)
        self.monitor.wait_for_main()

        device = accelerator.device
        self.train_data, self.eval_data = (
            MemoryBatches(splits[split].to(device)) if splits is not None else
            open_batches(cfg.data.path, manifest, split, cfg.data.mode, cfg.data.num_workers, device, self.record.img_size)
            for split in (cfg.data.train_split, cfg.data.eval_split)
        )
        if not len(self.train_data):
            raise DataError(f"split '{cfg.data.train_split}' of {cfg.data.path} has no samples to train on.")
        if cfg.data.train_subset > len(self.train_data):
            raise DataError(
                f"data.train_subset={cfg.data.train_subset} exceeds the {len(self.train_data)} training images left "
                f"after skipping bad shards; lower it or repair the shards."
            )
        self.subset = subset_indices(len(self.train_data), cfg.data.train_subset, cfg.train.seed) if cfg.data.train_subset else None
        self.num_train = len(self.subset) if self.subset is not None else len(self.train_data)
        self.steps_per_epoch = num_steps(self.num_train, cfg.train.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs

        self.state = TrainState()
        self.transform = BatchTransform((self.record.img_size, self.record.img_size), self.record.mean, self.record.std)
        self.fused_attn = set_fused_attention(model, cfg.model.fused_attn)
        self.teacher = load_teacher(cfg.distill, list(manifest.classes), device) if cfg.distill.type != "none" else None
        if self.teacher is not None and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # training forward returns (class head, distillation head)
        model.to(device)
        self.lr_multiplier = lr_multiplier(cfg.optim, cfg.train.batch_size)
        optimizer = build_optimizer(model, cfg.optim, cfg.surgery.lr_decay, cfg.train.batch_size)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        if resume:
            load_weights(model, resume["model"], self.record, source=str(self.resume_path))
        self.features_cached = self._cache_features(model)
        self.ema = None
        if cfg.ema.enabled:
            self.ema = ModelEma(model, decay_for_run(cfg.ema, self.total_steps), cfg.ema.warmup)
        self.raw_model = model
        """The model itself: state dicts, EMA updates and evaluation use it (no DDP or compile wrapper)."""
        want_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
        self.compiled = self._compiled(model) if want_compile and not self.features_cached else None
        # On cached features only the classifier runs in a training step (and DDP syncs only its gradients).
        trained = model.get_classifier() if self.features_cached else model
        self.model, self.optimizer = accelerator.prepare(trained if self.compiled is None else self.compiled, optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.fused_fp16 = accelerator.scaler is not None and bool(optimizer.defaults.get("fused"))
        self.grad_norm = torch.zeros(())
        own_checkpoint = bool(resume) and self.resume_path.resolve().is_relative_to(self.run_dir.resolve())
        # another run's checkpoint seeds this run's weights, not its W&B run
        self.checkpoint_tracker = resume.get("tracker") if own_checkpoint else None
        if resume:
            self._restore(resume)
        else:
            # Identical weights everywhere; from here each rank needs its own random stream (drop-path).
            set_seed(cfg.train.seed + accelerator.process_index)
        self.tracker = RunTracker(accelerator, cfg, self.run_dir, list(manifest.classes))
        self.stops = StopRequests(self.run_dir, accelerator, cfg.checkpoint.stop_check_every)
        self.stop_reason: str | None = None
        self.trace = None
        if cfg.data.trace_samples:
            (self.run_dir / TRACE_DIR).mkdir(parents=True, exist_ok=True)
            self.trace = open(self.run_dir / TRACE_DIR / f"rank{accelerator.process_index}.jsonl", "a", buffering=1)
        self._print_start(resume is not None)

    def _print_start(self, resumed: bool) -> None:
        cfg, accelerator, record = self.cfg, self.accelerator, self.record
        lr = cfg.optim.lr * self.lr_multiplier
        scaled = f" (optim.lr {cfg.optim.lr:g} x {self.lr_multiplier:.4g}, lr_scale={cfg.optim.lr_scale})" if cfg.optim.lr_scale != "none" else ""
        extras = [name for name, on in (
            ("EMA decay %.6f" % self.ema.decay if self.ema else "", self.ema is not None),
            (f"distillation ({cfg.distill.type}) from {cfg.distill.teacher}", self.teacher is not None),
            (f"{cfg.train.grad_accum_steps} micro-batches per step", cfg.train.grad_accum_steps > 1),
            (f"torch.compile ({self.state.compile_seconds:.1f} s to compile)", self.compiled is not None),
            ("fused attention", self.fused_attn),
            ("head trained on cached backbone features", self.features_cached),
            ("DDP static graph", accelerator.num_processes > 1 and ddp_options(cfg)["static_graph"]),
        ) if on]
        subset = f" (subset of {self.num_train})" if self.subset is not None else ""
        accelerator.print(
            f"distvit: {accelerator.num_processes} process(es) on {accelerator.distributed_type.value} "
            f"({accelerator.device.type}), mixed precision {accelerator.mixed_precision}; {record.model_name} at "
            f"{record.img_size}px/patch {record.patch_size} ({record.tokens_per_image} tokens, "
            f"{record.trainable_params:,} trainable params); {len(self.train_data)} train{subset} / "
            f"{len(self.eval_data)} {cfg.data.eval_split} images, {self.steps_per_epoch} steps/epoch of "
            f"{cfg.train.batch_size}; effective peak lr {lr:.4g}{scaled}"
            + (f"; {', '.join(extras)}" if extras else "")
            + f"; run dir {self.run_dir}"
            + (f"; resumed from {self.resume_path} at step {self.state.step}" if resumed else "")
        )

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """torch.compile the model and compile it now, with a forward and backward on a dummy micro-batch
        (before DDP wraps it and before the training RNG is seeded). All ranks agree: if compiling fails on
        any of them, every rank warns and trains eagerly, so no rank runs a step the others do not."""
        supported, reason = compile_supported()
        failure = "" if supported else reason
        compiled = None
        if not failure:
            start = time.perf_counter()
            micro = self.cfg.train.batch_size // self.accelerator.num_processes // self.cfg.train.grad_accum_steps
            # a batch shaped and laid out (channels-last strides) like the transform's output: no recompile
            stored = self.manifest.image_size or (self.record.img_size, self.record.img_size)
            dummy = self.transform(torch.zeros(micro, *stored, 3, dtype=torch.uint8, device=self.accelerator.device))
            try:
                compiled = torch.compile(model)
                with self.accelerator.autocast():
                    output = compiled(dummy)
                sum(o.float().sum() for o in (output if isinstance(output, tuple) else (output,))).backward()
            except Exception as err:  # compiler failures come in many types
                failure = f"torch.compile failed ({type(err).__name__}: {str(err)[:300]})"
            model.zero_grad(set_to_none=True)
            self.state.compile_seconds = time.perf_counter() - start
        failures = [f for f in gather_object([failure]) if f]
        if failures:
            warnings.warn(f"train.compile=true: {failures[0]}; training without it on every rank.")
            self.state.compile_seconds = 0.0
            return None
        return compiled

    def _cache_features(self, model: torch.nn.Module) -> bool:
        """Replace the training data by the frozen backbone's features when train.cache_features allows
        and the run is head-only (see distvit.engine.features); returns whether it did."""
        cfg = self.cfg
        if cfg.train.cache_features is False:
            return False
        blockers = cache_blockers(cfg, model)
        if blockers:
            if cfg.train.cache_features:
                raise ConfigError(
                    f"train.cache_features=true needs a head-only run, but: {'; '.join(blockers)}. "
                    f"Leave train.cache_features empty to use it only where possible."
                )
            return False
        start = time.perf_counter()
        indices = self.subset if self.subset is not None else sequential_order(len(self.train_data))
        features = compute_features(model, self.train_data, indices, self.transform, cfg.train.eval_batch_size, self.accelerator)
        self.train_data = MemoryBatches(features)
        self.state.feature_seconds = time.perf_counter() - start
        return True

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
        if payload["epoch"] >= self.cfg.train.epochs:
            raise RunFinished(
                f"{source} already completed {payload['epoch']} of train.epochs={self.cfg.train.epochs} epochs; "
                f"nothing to resume (the run directory is unchanged). Raise train.epochs to train longer."
            )
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
        if data["seed"] != self.cfg.train.seed or data.get("subset", 0) != self.cfg.data.train_subset:
            raise CheckpointError(
                f"cannot resume from {source} with train.seed={self.cfg.train.seed}, data.train_subset="
                f"{self.cfg.data.train_subset}: it used seed {data['seed']}, subset {data.get('subset', 0)}, and the "
                f"epoch order depends on them."
            )
        if payload["data"].get("global_batch") not in (None, self.cfg.train.batch_size):
            warnings.warn(
                f"resuming {source} with train.batch_size={self.cfg.train.batch_size} (it trained with "
                f"{payload['data']['global_batch']}): every sample is still seen once per epoch, but the lr schedule "
                f"is re-planned in steps of the new batch."
            )
        if (payload.get("ema") is not None) != self.cfg.ema.enabled:
            raise CheckpointError(
                f"cannot resume from {source} with ema.enabled={self.cfg.ema.enabled}: the checkpoint was written "
                f"{'with' if payload.get('ema') is not None else 'without'} an EMA. Resume with the run's own config."
            )

    def _restore(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(payload["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(payload["ema"])
            self.ema.updates = int(payload["ema_state"]["updates"])
            self.ema.decay = float(payload["ema_state"]["decay"])  # sized to the run as first planned
        self.state.step, self.state.epoch = payload["step"], payload["epoch"]
        self.state.samples_in_epoch = payload["data"]["samples_in_epoch"]
        self.state.last_eval = dict(payload["metrics"])
        self.state.best_score = payload.get("best_score", -math.inf)
        rng = payload["rng"]
        if len(rng) == self.accelerator.num_processes:
            torch.set_rng_state(rng[self.accelerator.process_index]["cpu"])
            if "cuda" in rng[self.accelerator.process_index] and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng[self.accelerator.process_index]["cuda"])
        else:  # another world size: fresh, distinct streams (only drop-path draws from them)
            set_seed(self.cfg.train.seed + self.state.step * 1000 + self.accelerator.process_index)

    # -- checkpoints ----------------------------------------------------------------------------------

    def save(self, name: str, periodic: bool = False) -> None:
        """All ranks call this (it gathers every rank's RNG state); rank 0 writes, then marks it latest."""
        rng_states = gather_object([rng_state()])
        if self.accelerator.is_main_process:
            scaler = self.accelerator.scaler
            payload = {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": self.ema.module.state_dict() if self.ema else None,
                "ema_state": {"updates": self.ema.updates, "decay": self.ema.decay} if self.ema else None,
                "epoch": self.state.epoch,
                "step": self.state.step,
                "data": {
                    "epoch": self.state.epoch, "samples_in_epoch": self.state.samples_in_epoch,
                    "seed": self.cfg.train.seed, "manifest": self.manifest.fingerprint(),
                    "split": self.cfg.data.train_split, "global_batch": self.cfg.train.batch_size,
                    "subset": self.cfg.data.train_subset,
                },
                "data_image_size": self.data_image_size,
                "rng": rng_states,
                "surgery": self.record.to_dict(),
                "classes": list(self.manifest.classes),
                "config": self.cfg.to_dict(),
                "metrics": dict(self.state.last_eval),
                "best_score": self.state.best_score,
                "tracker": {"wandb_run_id": self.tracker.run_id},
            }
            save_checkpoint(self.checkpoint_dir / name, payload)
            mark_latest(self.checkpoint_dir, name, self.state.step, self.state.epoch)
            if periodic:
                prune_periodic(self.checkpoint_dir, self.cfg.checkpoint.keep_last, self._checkpoint_step)
        self.monitor.wait_for_main()  # not a training collective: a slow write is not a hung rank

    def _checkpoint_step(self, name: str) -> int:
        """Optimizer step of a periodic checkpoint, from its name (epoch_NNN.pt or step_NNNNNNNN.pt)."""
        number = int(name.split("_")[1].split(".")[0])
        return number * self.steps_per_epoch if name.startswith("epoch_") else number

    # -- training -------------------------------------------------------------------------------------

    def _watch_compute_dtype(self) -> None:
        """Record the classifier's output dtype once (autocast on or off)."""
        classifier = self.raw_model.get_classifier()
        if isinstance(classifier, tuple):  # distilled DeiT: (head, head_dist)
            classifier = classifier[0]

        def record_dtype(module, args, output):
            self.state.compute_dtype = str(output.dtype).removeprefix("torch.")
            handle.remove()

        handle = classifier.register_forward_hook(record_dtype)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        order = epoch_order(self.num_train, self.cfg.train.seed, epoch)
        return self.subset[order] if self.subset is not None else order

    def epoch_plan(self, epoch: int, start_sample: int = 0) -> tuple[EpochPlan, slice]:
        """This rank's plan of `epoch` from `start_sample` on, and its slice of each global batch."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        plan = EpochPlan(self.epoch_order(epoch), self.cfg.train.batch_size, world, rank, start_sample=start_sample)
        return plan, slice(rank * plan.local_batch, (rank + 1) * plan.local_batch)

    def _loss(self, output: Any, labels: torch.Tensor, soft: torch.Tensor | None, teacher: torch.Tensor | None) -> torch.Tensor:
        """Per-sample loss: label loss (smoothing, mixing), plus DeiT's distillation term with a teacher."""
        head, distill_head = output if isinstance(output, tuple) else (output, output)
        loss = label_loss(head, labels, self.cfg.train.label_smoothing, soft)
        if teacher is None:
            return loss
        d = self.cfg.distill
        return (1 - d.alpha) * loss + d.alpha * distillation_loss(distill_head, teacher, d.type, d.tau)

    def train_step(self, batch, images: torch.Tensor, labels: torch.Tensor, local: slice, global_batch: int,
                   timer: PhaseTimer | None = None) -> torch.Tensor:
        """One optimizer step on this rank's share of a global batch; returns the summed loss (on device).
        Nothing in it waits for the device. `timer` (benchmarks) marks the end of each phase."""
        x, soft, valid = self._step_inputs(batch, images, labels, local, global_batch)
        if timer:
            timer.mark("data")
        loss_sum = self._forward_backward(x, labels, soft, valid, batch.global_valid)
        if timer:
            timer.mark("forward_backward")
        self._optimizer_step()
        if timer:
            timer.mark("optimizer")
        return loss_sum

    def _step_inputs(self, batch, images: torch.Tensor, labels: torch.Tensor, local: slice, global_batch: int):
        """The model's input (augmented, resized, normalised, mixed), soft targets if mixed, valid mask."""
        cfg, device = self.cfg, self.accelerator.device
        valid = to_device(batch.valid, device)
        if self.features_cached:
            return images, None, valid
        seed = step_seed(cfg.train.seed, self.state.epoch, batch.first_slot)
        augmentation = None
        if cfg.data.augment == "crop_flip":
            augmentation = Augmentation.sample(global_batch, cfg.data.crop_padding, True, torch.Generator().manual_seed(seed))
            augmentation = augmentation.slice(local.start, local.stop)
        x = self.transform(images, augmentation)
        decision = sample_mix(cfg.data, [seed, 1], x.shape[-2], x.shape[-1])
        soft = None
        if decision.kind != "none":
            soft = mixed_targets(labels, self.record.num_classes, cfg.train.label_smoothing, decision)
            x = apply_mix(x, decision)
        return x, soft, valid

    def _forward_backward(self, x: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None,
                          valid: torch.Tensor, global_valid: int) -> torch.Tensor:
        """Forward and backward over the micro-batches (DDP all-reduces on the last); the summed loss."""
        accelerator, micro = self.accelerator, self.cfg.train.grad_accum_steps
        size = x.shape[0] // micro
        loss_sum = torch.zeros((), device=accelerator.device)
        for index in range(micro):
            part = slice(index * size, (index + 1) * size)
            teacher = None
            if self.teacher is not None:  # per micro-batch: accumulation bounds the teacher's memory too
                with accelerator.autocast():
                    teacher = self.teacher.logits(x[part], self.record.mean, self.record.std).float()
            with nullcontext() if index == micro - 1 else accelerator.no_sync(self.model):
                output = self.model(x[part])  # prepare()d models run in autocast themselves
                losses = self._loss(
                    output, labels[part], soft[part] if soft is not None else None, teacher,
                ) * valid[part]
                accelerator.backward(losses.sum() * (accelerator.num_processes / global_valid))
            loss_sum += losses.detach().sum()
        return loss_sum

    def _optimizer_step(self) -> None:
        """Clip, step (unless fp16 overflowed), schedule, zero the gradients, update the EMA."""
        accelerator = self.accelerator
        if self.cfg.optim.clip_grad_norm:
            self.grad_norm = accelerator.clip_grad_norm_(self.trainable, self.cfg.optim.clip_grad_norm)
        # fp16 overflow: no step, so no schedule or EMA step. A fused optimizer is always "called" by the
        # scaler (it gets found_inf), so Accelerate's flag misses those skips; a lowered scale shows them
        # (reading the scale syncs with the device, so only where it is needed).
        scale = accelerator.scaler.get_scale() if self.fused_fp16 else None
        self.optimizer.step()
        skipped = accelerator.optimizer_step_was_skipped or (self.fused_fp16 and accelerator.scaler.get_scale() < scale)
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and not skipped:
            self.ema.update(self.raw_model)

    def train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when it stopped mid-epoch (planned or requested)."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        if not state.compute_dtype:
            self._watch_compute_dtype()
        plan, local = self.epoch_plan(state.epoch, state.samples_in_epoch)
        self.model.train()
        loss_sum = torch.zeros((), device=accelerator.device)  # stays on the device between logs: no per-step sync
        window_images, window_wait, window_start = 0, 0.0, time.perf_counter()
        progress = tqdm(
            total=len(plan), desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            disable=not accelerator.is_main_process, dynamic_ncols=True, leave=False,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        batches = iter(self.train_data.epoch(plan))
        while True:
            wait_start = time.perf_counter()
            item = next(batches, None)
            window_wait += time.perf_counter() - wait_start
            if item is None:
                break
            batch, images, labels = item
            step_lr = max(g["lr"] for g in self.optimizer.param_groups)  # the peak lr this step uses (logged)
            loss_sum += self.train_step(batch, images, labels, local, plan.global_batch)
            state.step += 1
            state.samples_in_epoch += batch.global_valid
            if self.trace is not None:
                ids = batch.indices[batch.valid].tolist()
                self.trace.write(json.dumps({"epoch": state.epoch + 1, "step": state.step, "ids": ids}) + "\n")
            window_images += batch.global_valid
            progress.update(1)
            last_of_epoch = batch.step == len(plan) - 1
            if state.step % cfg.train.log_every == 0 or last_of_epoch:
                mean_loss = accelerator.reduce(loss_sum, reduction="sum").item() / window_images
                elapsed = time.perf_counter() - window_start
                record = {
                    "split": "train", "epoch": state.epoch + 1, "step": state.step, "loss": mean_loss,
                    "lr": step_lr, "images_per_sec": window_images / elapsed,
                    "images_per_sec_per_rank": window_images / elapsed / world,
                    "data_wait_fraction": window_wait / elapsed,
                }
                if cfg.optim.clip_grad_norm:
                    record["grad_norm"] = float(self.grad_norm)
                if self.ema is not None:
                    record["ema_decay"] = self.ema.current_decay()
                self.tracker.log(record)
                progress.set_postfix(loss=f"{mean_loss:.3f}")
                state.train_seconds += elapsed
                state.images_seen += window_images
                loss_sum.zero_()
                window_images, window_wait, window_start = 0, 0.0, time.perf_counter()
            if last_of_epoch:  # run() evaluates, then checkpoints / stops as due
                state.epoch += 1
                state.samples_in_epoch = 0
                continue
            reason = self._stop_reason()
            if reason:
                self.stop_reason = reason
                self.save(step_name(state.step))
                progress.close()
                return False
            if self._step_checkpoint_due():
                self.save(step_name(state.step), periodic=True)
        progress.close()
        return True

    def _stop_reason(self, at_epoch_end: bool = False) -> str | None:
        """Why to stop after this step, if at all: a request (agreed by all ranks; it wins, so a signal at
        the planned step still exits as stopped and a STOP file is consumed) or train.stop_at_step."""
        requested = self.stops.agreed(self.state.step, force=at_epoch_end)
        planned = bool(self.cfg.train.stop_at_step) and self.state.step == self.cfg.train.stop_at_step
        return requested or (PLANNED_STOP if planned else None)

    def _step_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.state.step % every == 0

    # -- evaluation -----------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, EvalResult]:
        models = {"model": self.raw_model}
        if self.ema is not None:
            models["ema"] = self.ema.module
        return evaluate_models(
            models, self.eval_data, self.transform, self.cfg.train.eval_batch_size, self.accelerator,
            self.record.num_classes,
        )

    def _evaluate_and_log(self) -> None:
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        results = self.evaluate()
        raw, ema = results["model"], results.get("ema")
        state.last_eval = {
            "split": cfg.data.eval_split, "epoch": state.epoch, "step": state.step,
            "num_samples": raw.num_samples, **raw.record(), **(ema.record("ema_") if ema else {}),
        }
        self.tracker.log(state.last_eval)
        self.tracker.log_images(f"{cfg.data.eval_split}/predictions", raw.samples, state.step)
        if accelerator.is_main_process:
            confusion = {
                "classes": list(self.manifest.classes), "split": cfg.data.eval_split, "epoch": state.epoch,
                "step": state.step, "model": raw.confusion, **({"ema": ema.confusion} if ema else {}),
            }
            (self.run_dir / CONFUSION_NAME).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / CONFUSION_NAME, json.dumps(confusion).encode())
        accelerator.print(
            f"epoch {state.epoch}: {cfg.data.eval_split} accuracy {raw.accuracy:.4f} ({raw.correct}/{raw.num_samples}), "
            f"top-5 {raw.top5:.4f}, loss {raw.loss:.4f}"
            + (f"; EMA accuracy {ema.accuracy:.4f}, loss {ema.loss:.4f}" if ema else "")
        )
        score = (ema or raw).accuracy
        if cfg.checkpoint.keep_best and score > state.best_score:
            state.best_score = score
            self.save(BEST_NAME)

    # -- the run --------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs with evaluation and checkpoints; returns the summary."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        self.tracker.start(
            cfg,
            {"surgery": self.record.to_dict(), "world_size": accelerator.num_processes,
             "effective_lr": cfg.optim.lr * self.lr_multiplier, "ema_decay": self.ema.decay if self.ema else None},
            self.checkpoint_tracker,
        )
        self.monitor.wait_for_main()  # W&B starts on rank 0 only
        finished = False
        try:
            while state.epoch < cfg.train.epochs:
                if not self.train_epoch():
                    break
                last = state.epoch == cfg.train.epochs
                if last or (cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0):
                    self._evaluate_and_log()
                if last:
                    self.save(FINAL_NAME)
                    finished = True
                    break
                reason = self._stop_reason(at_epoch_end=True)
                if reason:
                    self.stop_reason = reason
                    self.save(step_name(state.step))
                    break
                if cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0:
                    self.save(f"epoch_{state.epoch:03d}.pt", periodic=True)
                elif self._step_checkpoint_due():
                    self.save(step_name(state.step), periodic=True)
            summary = self._summary(finished)
            if accelerator.is_main_process:
                self._write_outputs(finished, summary)
            self.monitor.wait_for_main()
        finally:
            self.stops.close()
            self.tracker.finish()
            if self.trace is not None:
                self.trace.close()
        if not finished:
            accelerator.print(
                f"distvit: stopped after step {state.step} ({self.stop_reason}); checkpoint "
                f"{self.checkpoint_dir / step_name(state.step)}. Continue with train.resume=auto."
            )
        self.monitor.wait_for_main()  # rank 0 may still be uploading W&B files (tracker.finish)
        accelerator.end_training()
        return summary

    def _write_outputs(self, finished: bool, summary: dict[str, Any]) -> None:
        """Main process, at the end or at a stop: export, plots, summary.json or stopped.json."""
        from distvit.run.report import write_report

        if finished and self.cfg.checkpoint.export:
            last = self.state.last_eval
            use_ema = self.ema is not None and last.get("ema_accuracy", -1) >= last.get("accuracy", 0)
            weights = (self.ema.module if use_ema else self.raw_model).state_dict()
            summary["export"] = {"weights": "ema" if use_ema else "model"}
            paths = export_model(self.run_dir, weights, self.record, {
                "weights": summary["export"]["weights"], "classes": list(self.manifest.classes),
                "data_image_size": self.data_image_size,
                "metrics": last,
            })
            summary["export"]["files"] = [str(p) for p in paths]
        plots = write_report(self.run_dir)
        self.tracker.log_image_files(
            {f"{self.cfg.data.eval_split}/{p.stem}": p for p in plots if p.stem.startswith("confusion")}, self.state.step,
        )
        if finished:
            write_summary(self.run_dir, summary)
        else:
            atomic_write_bytes(self.run_dir / STOPPED_NAME, json.dumps({
                "step": self.state.step, "epoch": self.state.epoch, "reason": self.stop_reason,
                "checkpoint": str(self.checkpoint_dir / step_name(self.state.step)),
            }).encode())
        if self.stop_reason and self.stop_reason != PLANNED_STOP:
            self.stops.consume_stop_file()

    def _summary(self, finished: bool) -> dict[str, Any]:
        accelerator, state = self.accelerator, self.state
        return {
            "finished": finished,
            "stop_reason": self.stop_reason,
            "final": state.last_eval,
            "best_score": state.best_score if math.isfinite(state.best_score) else None,
            "checkpoint": str(self.checkpoint_dir / (FINAL_NAME if finished else step_name(state.step))),
            "world_size": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision,
            "compute_dtype": state.compute_dtype,
            "steps": state.step,
            "epochs": state.epoch,
            "train_seconds": state.train_seconds,
            "train_images_per_sec": state.images_seen / state.train_seconds if state.train_seconds else None,
            "compile_seconds": state.compile_seconds or None,
            "feature_cache_seconds": state.feature_seconds if self.features_cached else None,
            "effective_lr": self.cfg.optim.lr * self.lr_multiplier,
            "ema_decay": self.ema.decay if self.ema else None,
            "surgery": self.record.to_dict(),
        }


def run_training(cfg: Config, manifest: Manifest, bad_shards: dict[str, str] | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint as configured; returns the run summary (also in summary.json).
    A collective that fails or times out (another rank died or hangs) becomes a `PeerFailure` naming
    the unresponsive ranks, within train.timeout_s."""
    trainer = Trainer(cfg, manifest, bad_shards)
    try:
        return trainer.run()
    except Exception as err:
        if trainer.accelerator.num_processes == 1 or not is_peer_failure(err):
            raise
        who = trainer.monitor.unresponsive()
        latest = trainer.checkpoint_dir / LATEST_NAME
        raise PeerFailure(
            f"rank {trainer.accelerator.process_index}: lost contact with the other ranks at step {trainer.state.step} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). {who}. Another rank died or hangs "
            f"(train.timeout_s={cfg.train.timeout_s}); restart with train.resume=auto to continue from "
            f"{'the checkpoint in ' + str(latest) if latest.exists() else 'the start (no checkpoint yet)'}."
        ) from None
